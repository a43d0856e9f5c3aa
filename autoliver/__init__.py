"""autoliver: self-configuring liver and liver-tumour segmentation for abdominal CT.

Labels follow the LiTS / MSD Task03 convention: 0 background, 1 liver, 2 tumour.
Arrays are stored (Z, Y, X) with spacing in mm in the same order; SimpleITK's (x, y, z)
order is converted at the I/O boundary only.
"""

__version__ = "0.1.0"
