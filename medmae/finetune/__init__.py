"""Fine-tuning from an exported encoder: segmentation (MONAI UNETR) and classification (timm), with
the pretraining preprocessing rebuilt from the export card."""
