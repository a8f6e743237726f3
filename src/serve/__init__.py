"""Serving a trained run: the MLflow pyfunc model, predictions on new images and heatmaps."""
