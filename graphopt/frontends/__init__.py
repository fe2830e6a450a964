"""Frontends: a torch.nn.Module (torch.export) or an ONNX file becomes the IR.

May import: graphopt.ir, graphopt.ops (op registration for saved programs), graphopt.errors.
"""
