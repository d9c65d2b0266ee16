"""The round adapter: each stage reads its inputs from the store, calls one method function
and writes its outputs; the run spec they share, and the packed-attention kernels chosen for it
once at the run's start (``kernels``)."""
