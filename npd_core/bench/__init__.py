"""Benchmarks. ``npd bench``'s rules and types (``harness``), its training clock (``clock``),
round sizing (``sizing``), hyperparameter search (``search``), statistics (``stats``), curves,
saved progress, cost model and plots; the filter study's decision rule; and the benches of parts
of the method (packing, generation, scale-out, GPU). No Prefect or MLflow: ``flows/`` runs them."""
