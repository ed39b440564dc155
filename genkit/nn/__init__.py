"""Network blocks shared by families (UNet wrappers, couplings, quantizers, critics)."""
