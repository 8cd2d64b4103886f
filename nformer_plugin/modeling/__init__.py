"""Pure-torch model code (no FastReID import): NFormer, its losses and the backbones."""
