"""Training side: demo data, the VAE, training, calibration, export and evaluation."""
