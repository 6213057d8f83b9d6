"""microseg: TransUNet segmentation of micro-ultrasound prostate slices."""

__version__ = "0.1.0"
