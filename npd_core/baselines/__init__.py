"""The baselines (SFT, synchronous on-policy) under the bench's clock, and external peers."""
