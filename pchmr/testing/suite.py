"""What every contract suite shares: the ``known_gaps`` fixture, and an error check that names
what it expected.

A suite is a plain class of ``test_*`` check methods (not collected by pytest until a ``Test*``
subclass overrides its fixtures). Each check runs under its own name, so ``pytest -k
test_rejects_unknown_options`` runs one check, and a check listed in ``known_gaps`` runs as
``xfail`` with the given reason (scikit-learn's ``estimator_checks`` style).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import pytest

__all__ = ["ContractSuite", "raises_matching"]


class ContractSuite:
    """Base of the suites written on this pattern: the ``known_gaps`` fixture and its marker."""

    @pytest.fixture(scope="class")
    @classmethod
    def known_gaps(cls) -> Mapping[str, str]:
        """``{check name: reason}``: those checks run as ``xfail`` with the reason."""
        return {}

    @pytest.fixture(autouse=True)
    def _mark_known_gaps(self, request: pytest.FixtureRequest, known_gaps: Mapping[str, str]) -> None:
        check = getattr(request.node, "originalname", request.node.name)
        if check in known_gaps:
            request.applymarker(pytest.mark.xfail(reason=known_gaps[check], strict=False))


def raises_matching(
    call: Callable[[], object], errors: type[BaseException] | tuple[type[BaseException], ...], pattern: str, what: str
) -> BaseException:
    """``call()`` must raise one of ``errors`` whose message matches ``pattern`` (``re.search``);
    returns the exception. ``what`` describes the request in the assertion message."""
    try:
        call()
    except errors as exc:
        assert str(exc).strip(), f"{what}: the {type(exc).__name__} has an empty message"
        assert re.search(pattern, str(exc)), f"{what}: the message {str(exc)!r} does not match {pattern!r}"
        return exc
    names = errors.__name__ if isinstance(errors, type) else " or ".join(e.__name__ for e in errors)
    pytest.fail(f"{what}: no {names} was raised")
