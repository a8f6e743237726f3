"""The PASCAL VOC 2012 + SBD helpers behind `load_dataset.custom_pascal` (its public entry):
class names and label conversion, folder layout, augmentation, the resized cache, pictures."""
