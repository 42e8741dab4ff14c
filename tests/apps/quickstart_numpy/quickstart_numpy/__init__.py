"""quickstart-numpy: a Flower Message-API app with a NumPy "model"."""
