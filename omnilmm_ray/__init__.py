"""omnilmm-ray: caption huge image collections with vision-language models on Ray + lmdeploy.

Importing the package imports neither Ray Data's engine stack, torch nor lmdeploy.
"""

__version__ = "0.1.0"
