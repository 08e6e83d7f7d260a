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

Privacy hooks (see :class:`~pchmr.core.contracts.strategy.StrategyParts`): ``before_round`` runs before
step 1 (a :class:`~pchmr.core.contracts.strategy.PrivacyBudgetExhausted` stops the run cleanly, with
``"stopped"`` in final.json); a ``round_protocol`` replaces step 2; ``round_metrics`` are merged
into the round's record. On the client, one mod chains the strategy's ``client_mods`` around
every handler, train messages carrying ``pchmr-stage`` go to the strategy's ``client_handlers``,
and :func:`train_locally` applies the ``update_transforms`` after local training.
"""
