"""The round adapter: each stage reads its inputs from the store, calls one method function
and writes its outputs."""
