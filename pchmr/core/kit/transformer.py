"""Transformer pieces shared by the token-based backbones (FastMETRO, TORE).

The layout follows the encoder–decoder of FastMETRO (itself derived from DETR), written
batch-first:

* **pre-LayerNorm** residual blocks: ``x = x + Dropout(Sublayer(LayerNorm(x)))``;
* positional encodings are added to the *queries and keys* of attention, never to values;
* the encoder runs self-attention over ``[prefix tokens, image tokens]`` where only image
  tokens carry a positional encoding (a prefix token such as FastMETRO's camera token gets a
  zero one);
* the decoder runs masked self-attention among its query tokens (e.g. joint and vertex
  tokens), then cross-attention to the encoded image tokens (keys get the image positional
  encoding), then an MLP;
* both stacks end with a LayerNorm.

Attention masks use the convention of :func:`torch.nn.functional.scaled_dot_product_attention`:
a bool tensor where ``True`` means *may attend* (the opposite of ``nn.MultiheadAttention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DecoderLayer",
    "Dropout",
    "EncoderDecoder",
    "EncoderLayer",
    "MultiHeadAttention",
    "fast_dropout",
    "sine_position_encoding",
]

#: Wavelength base of the sine encoding (as in "Attention is all you need" and DETR).
SINE_TEMPERATURE = 10000.0
#: Grid coordinates are normalised to (0, 2π] before the sine encoding.
SINE_SCALE = 2.0 * math.pi
#: Guards the normalisation of grid coordinates.
SINE_EPS = 1e-6
#: :func:`fast_dropout` draws one 16-bit integer per element: p is rounded to a multiple of 2⁻¹⁶.
DROPOUT_LEVELS = 1 << 16
_INT16_MIN = -(1 << 15)
_INT64_MIN = -(1 << 63)


def _uniform16(shape: torch.Size) -> Tensor:
    """CPU int16 tensor of ``shape``, uniform on [-2¹⁵, 2¹⁵): four draws per 64-bit random word."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(_INT64_MIN, None)
    return words.view(torch.int16)[:n].view(shape)


def _drop_threshold(p: float) -> tuple[int, float]:
    """(t, scale): an element is dropped when its 16-bit draw is < t, i.e. with probability p
    rounded to a multiple of 2⁻¹⁶; scale = 1 / (1 - that probability)."""
    drop_levels = min(round(p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)
    return _INT16_MIN + drop_levels, DROPOUT_LEVELS / (DROPOUT_LEVELS - drop_levels)


def _drop_mask(shape: torch.Size, p: float) -> Tensor:
    """CPU bool mask of ``shape``, each element True (drop) with probability p (rounded as in
    :func:`_drop_threshold`)."""
    threshold, _ = _drop_threshold(p)
    return _uniform16(shape) < threshold


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    On the CPU, torch's dropout draws one Mersenne-Twister number per element through
    ``bernoulli_``, which costs about as much as the matrix products of a transformer layer.
    Here the draws come from 64-bit random words split into four 16-bit integers (about 10×
    less CPU time), so p is rounded to the nearest multiple of 2⁻¹⁶ (0.1 → 0.100006). The
    draws become a mask already in ``x``'s dtype holding 0 or 1/(1-p), so the forward and the
    backward pass are one multiplication each (a bool mask would be converted to float on
    both passes). Other devices use :func:`torch.nn.functional.dropout`.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    threshold, scale = _drop_threshold(p)
    keep_scale = torch.tensor(scale, dtype=x.dtype)
    mask = torch.where(_uniform16(x.shape) >= threshold, keep_scale, torch.zeros((), dtype=x.dtype))
    return x * mask


class Dropout(nn.Module):
    """:func:`fast_dropout` as a module (active in training mode only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def sine_position_encoding(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """2D sine positional encoding of an ``height × width`` grid → (height·width, dim), row-major.

    The first ``dim/2`` channels encode the row (y), the last ``dim/2`` the column (x). Each
    half interleaves sin/cos of the normalised coordinate (1..n scaled to (0, 2π]) at
    geometrically spaced frequencies. ``dim`` must be divisible by 4.
    """
    if dim % 4 != 0:
        raise ValueError(f"sine position encoding needs a dim divisible by 4, got {dim}")
    half = dim // 2
    ys = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    xs = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    ys = ys / (height + SINE_EPS) * SINE_SCALE
    xs = xs / (width + SINE_EPS) * SINE_SCALE
    index = torch.arange(half, dtype=torch.float32, device=device)
    freqs = SINE_TEMPERATURE ** (2.0 * torch.div(index, 2, rounding_mode="floor") / half)

    def encode(coords: Tensor) -> Tensor:  # (n,) → (n, half): sin on even, cos on odd channels
        angles = coords[:, None] / freqs
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(ys)[:, None, :].expand(height, width, half)
    pos_x = encode(xs)[None, :, :].expand(height, width, half)
    return torch.cat((pos_y, pos_x), dim=2).reshape(height * width, dim)


class MultiHeadAttention(nn.Module):
    """Multi-head attention on batch-first tensors with separate q/k/v projections.

    ``forward(query (B, Q, D), key (B, K, D), value (B, K, D), allowed (Q, K) bool | None)``
    → (B, Q, D). Parameters: 4·D² + 4·D, the same count as ``nn.MultiheadAttention``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention dim {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:  # (B, N, D) → (B, H, N, D/H)
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None = None) -> Tensor:
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(key))
        v = self._split(self.v_proj(value))
        if self.training and self.dropout > 0.0:
            out = self._attend_with_dropout(q, k, v, allowed)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _attend_with_dropout(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        """softmax(q·kᵀ/√d + mask) with dropout on the weights, then · v; (B, H, N, d) in and out.

        Written out because the fused kernel has no dropout; the mask bias and the 1/√d scale
        ride on one ``baddbmm``, and the dropout scale is applied to the (smaller) output.
        """
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout)
        b, h, n, d = q.shape
        q3 = q.reshape(b * h, n, d)
        k3t = k.reshape(b * h, -1, d).transpose(1, 2)
        scale = d**-0.5
        if allowed is None:
            scores = torch.bmm(q3, k3t).mul_(scale)
        else:
            bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
            scores = torch.baddbmm(bias, q3, k3t, alpha=scale)
        dropped = _SoftmaxDropout.apply(scores, _drop_mask(scores.shape, self.dropout))
        # the 1/(1-p) scale goes on the output, which is smaller than the weights here
        out = torch.bmm(dropped, v.reshape(b * h, -1, d)).mul_(_drop_threshold(self.dropout)[1])
        return out.view(b, h, n, d)


class _SoftmaxDropout(torch.autograd.Function):
    """``softmax(scores, -1)`` with the entries where ``drop`` is True set to zero (unscaled).

    One function so that the pair costs one pass over the weights each way besides the softmax
    itself: autograd's ``masked_fill`` would clone the weights forward and the gradient backward.
    Saves the softmax output (for its backward) and the 1-byte mask.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, drop: Tensor) -> Tensor:  # type: ignore[override]
        weights = scores.softmax(dim=-1)
        ctx.save_for_backward(weights, drop)
        return torch.where(drop, 0.0, weights)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        weights, drop = ctx.saved_tensors
        grad_weights = torch.where(drop, 0.0, grad)
        return torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype), None


class FeedForward(nn.Module):
    """Linear(D, F) → ReLU → Dropout → Linear(F, D)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


def _add(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: self-attention (positions on q, k) then MLP, each residual.

    ``forward(x (B, N, D), pos (N, D) or (B, N, D) | None, allowed (N, N) | None)`` → (B, N, D).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor | None = None, allowed: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        qk = _add(h, pos)
        x = x + self.dropout1(self.self_attn(qk, qk, h, allowed))
        return x + self.dropout2(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    """Pre-LN decoder layer: masked self-attention, cross-attention to memory, MLP.

    ``forward(tgt (B, Q, D), memory (B, M, D), memory_pos (M, D) | None, allowed (Q, Q) | None)``
    → (B, Q, D). The memory's positional encoding goes on the cross-attention keys; queries
    carry no positional encoding (the learned query embeddings are their identity).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.cross_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)

    def forward(
        self, tgt: Tensor, memory: Tensor, memory_pos: Tensor | None = None, allowed: Tensor | None = None
    ) -> Tensor:
        h = self.norm1(tgt)
        tgt = tgt + self.dropout1(self.self_attn(h, h, h, allowed))
        h = self.norm2(tgt)
        tgt = tgt + self.dropout2(self.cross_attn(h, _add(memory, memory_pos), memory))
        return tgt + self.dropout3(self.ffn(self.norm3(tgt)))


class EncoderDecoder(nn.Module):
    """FastMETRO's transformer: an encoder over ``[prefix, image]`` tokens, a decoder of queries.

    ``forward(prefix (B, P, D), image (B, N, D), queries (B, Q, D), image_pos (N, D),
    query_allowed (Q, Q) bool | None)`` → ``(prefix_out (B, P, D), image_out (B, N, D),
    queries_out (B, Q, D))``. The decoder attends to the encoded image tokens only (not the
    prefix), as in FastMETRO. Weight matrices get Xavier-uniform initialisation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if num_encoder_layers < 1 or num_decoder_layers < 1:
            raise ValueError(
                f"need at least one encoder and one decoder layer, got {num_encoder_layers} and {num_decoder_layers}"
            )
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_decoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(dim)
        self.decoder_norm = nn.LayerNorm(dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, prefix: Tensor, image: Tensor, image_pos: Tensor) -> tuple[Tensor, Tensor]:
        """→ (prefix_out (B, P, D), image_out (B, N, D)); prefix tokens get no positional encoding."""
        num_prefix = prefix.shape[1]
        pos = torch.cat((image_pos.new_zeros(num_prefix, image_pos.shape[-1]), image_pos), dim=0)
        x = torch.cat((prefix, image), dim=1)
        for layer in self.encoder_layers:
            x = layer(x, pos)
        x = self.encoder_norm(x)
        return x[:, :num_prefix], x[:, num_prefix:]

    def decode(self, queries: Tensor, memory: Tensor, memory_pos: Tensor, allowed: Tensor | None) -> Tensor:
        """→ (B, Q, D) decoded queries."""
        x = queries
        for layer in self.decoder_layers:
            x = layer(x, memory, memory_pos, allowed)
        return self.decoder_norm(x)

    def forward(
        self, prefix: Tensor, image: Tensor, queries: Tensor, image_pos: Tensor, query_allowed: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        prefix_out, image_out = self.encode(prefix, image, image_pos)
        return prefix_out, image_out, self.decode(queries, image_out, image_pos, query_allowed)
