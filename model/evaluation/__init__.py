"""Scoring restored images the way the paper's tables do.

  metrics.py   the columns (PSNR/SSIM on Y, bit-identical to BasicSR; what each learned metric is)
  weights.py   the weight files the learned metrics load: where each lives, where it comes from
  iqa.py       building the learned metrics (pyiqa, CLIP-I through timm) from those local files
  folders.py   pairing a restored folder with its reference folder
  runner.py    one evaluation: a folder (and its references) -> one table row
  tables.py    the results JSON and its Markdown rendering, one table per dataset
  paper.py     Tables I-VI in the paper's layout, the paper's own numbers beside ours

`model/evaluate.py` and `jobs/paper_tables.py` are the thin command lines over these.
"""
