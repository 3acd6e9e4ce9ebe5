"""GenEval, model-free: the prompt grammar (grammar), the decision rules (rules) and detector backends (backends).

The learned parts of the official benchmark (Mask2Former, CLIP) sit behind `backends`; everything else is
pure Python + numpy and reproduces djghosh13/geneval af4902f exactly.
"""
