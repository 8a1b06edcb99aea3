"""Shared logic of the LaTeX-OCR fine-tuning scripts.

One definition of a sample (prompt, messages, image sizing), of batching, of
generation, of metrics and of tracking, imported by data2csv.py, csv2json.py,
train.py and infer.py so that training and inference can never disagree.
"""
