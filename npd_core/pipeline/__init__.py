"""The round adapter: each stage reads its inputs from the store, calls one method function
and writes its outputs; the run spec they share, the packed-attention kernels chosen for it
once at the run's start (``kernels``), and the torchrun ranks a train stage on several
processes runs on (``workers``, ``learner_ranks``)."""
