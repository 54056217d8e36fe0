"""The adapter file: one safetensors file holding an adapter's factors and head and a JSON spec.

``container`` (safetensors, checksum, atomic writes), ``spec`` (the JSON spec, written and read back
checked) with ``templates`` (its slice maps), ``codes`` (low-bit tensors as stored), ``packs`` (a
version-4 file's one tensor per dtype), ``writer`` and ``save`` (writing one), ``info`` (reading one
without a model), ``compat`` (whether a file fits the model it is loaded onto), ``rebuild`` (its slices
on that model) and ``load`` (`load`, `load_many`). `factnet` re-exports the entry points.
"""
