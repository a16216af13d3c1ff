"""Class activation maps (GradCAM, XGradCAM, LayerCAM), batched."""
