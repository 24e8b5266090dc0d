"""Training side: from a folder of good images to a calibrated, self-checking ONNX bundle.

Modules, in the order a fit uses them: ``data`` (discovery, loading through
``service.preprocessing``, the held-out split), ``model`` and ``loss`` (the VAE and its ELBO),
``train`` (the loop), ``export`` (ONNX export and parity), ``calibrate`` (the decision rule and
calibration, with defects from ``synth``), ``fit`` (all of it, writing the bundle), then
``evaluate`` and ``report``. ``demo_data`` generates the built-in dataset; ``cli`` is the
command line.
"""
