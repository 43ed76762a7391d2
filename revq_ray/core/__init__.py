"""Pure-PyTorch core of revq-ray: no Ray, no DeepSpeed, no file formats beyond save/load.

Layout, standardizer, quantizers (ReVQ/VQ, SimVQ, GQ), rectifiers, the ReVQModel, losses and metrics.
"""
