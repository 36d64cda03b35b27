"""`taxonclip caption`: one caption per image from an image-text-to-text model.

base.py (the captioner interface and registry), tiny.py and hf.py (the captioners),
templates.py (named prompts), prompts.py (which rows may see their name), loader.py (images by
size, decoded by workers), shares.py (torchrun ranks, SLURM array tasks), parts.py (part files,
settings, the merged file), job.py (a job's steps), keyed.py (eval and train reading the file).
"""
