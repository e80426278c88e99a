"""A synthetic, captioned video world, generated on the fly from a seed: what the toy model is trained on.

No dataset can be downloaded, yet the small default model needs captioned video whose meaning can be checked
without a learned model. Three parts: the caption grammar (`grammar`), the scenes and their renderer (`scene`),
and the analytic scorer that measures how well any video, generated ones included, agrees with a caption
(`scorer`).
"""
