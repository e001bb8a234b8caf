"""Shapes and their samples: procedural unions of superquadrics (the embedded default), mesh
files and ShapeNet-style folders, wheel meshes; pools cached once; resumable batch streams."""
