"""Readers of foreign checkpoint files: the only place in jaxdiff that opens torch / pickle files.

  torch_file   files written by `torch.save` (zip or legacy format) and plain pickles holding tensors, read as
               NumPy arrays by a restricted unpickler; torch itself is not needed
  inception    pytorch-fid's Inception-v3 weights (`pt_inception-2015-12-05-6726825d.pth` or an .npz) as the
               variables of `jaxdiff.models.inception.InceptionV3`
  edm          EDM's network pickles (`network-snapshot-*.pkl`, the published CIFAR-10 models) and state dicts as
               jaxdiff SongUNet variables, model fields and a config.loss dict
"""
