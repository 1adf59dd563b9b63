"""The machinery behind textual_inversion.py's extras, one module per capability.

The tutorial's story stays in textual_inversion.py; what its flags add, and what can be
read and tested on its own, lives here. No module here imports the script.
"""
