"""The user's own data as inputs: image files and folders (images.py) read the way the runtime reads them, and
   ground-truth annotations in COCO format (coco.py) with the images they describe."""
