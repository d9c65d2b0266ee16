"""The method: Δ-IFD, the filter, losses, packing, attention, and the generate / score /
train / evaluate computations of one round. Readable in one sitting."""
