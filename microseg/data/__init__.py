"""The micro-US data layer: NIfTI volumes, the dataset layout, the phantom simulator,
the HDF5 slice cache, the torch dataset and the augmentation."""
