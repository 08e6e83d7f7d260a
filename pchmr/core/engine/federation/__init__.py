"""The federated runtime: a Flower ServerApp and ClientApp around :class:`HMRModule`.

Round r on the server:

1. sample ``per_round`` of the ``clients`` partition ids with a generator seeded by
   (run seed, r) — stateless, so a resumed run samples exactly what the killed run would have;
2. hand the strategy a view of the grid that contains only those clients' nodes, and let it
   build the train messages (``configure_train``) and aggregate the replies
   (``aggregate_train``, replies sorted by partition id so that sums are reproducible);
3. evaluate the global model on the held-out split every ``eval_every`` rounds (and at the
   last), append the metrics to ``rounds.jsonl`` and rewrite the checkpoint.

A client is a Flower node whose ``node_config`` carries ``partition-id`` (the Simulation
Engine sets it; a SuperNode gets it from ``--node-config``). The server learns which node
holds which partition with one ``query`` message per node at start-up.

The strategy's mechanisms (:mod:`pchmr.core.contracts.mechanism`; the loops over them are
:class:`~pchmr.core.engine.federation.mechanisms.MechanismRuntime`): ``before_round`` runs before
step 1 (a :class:`~pchmr.core.contracts.strategy.PrivacyBudgetExhausted` stops the run cleanly, with
``"stopped"`` in final.json); a ``round_protocol`` replaces step 2; ``round_metrics`` are merged
into the round's record and ``state_dict`` into the checkpoint. On the client, one mod chains the
mechanisms' ``client_mods`` around every handler, train messages carrying ``pchmr-stage`` go to
their ``client_handlers``, local training runs inside ``module.round(context)`` (``loss`` and
``training_step`` receive the :class:`~pchmr.core.contracts.mechanism.RoundContext`), and
:func:`train_locally` applies ``transform_update`` after it.
"""
