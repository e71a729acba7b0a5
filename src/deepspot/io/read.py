"""Readers (``ds.read``): slides, and spatial data as AnnData of raw counts with obsm['spatial'] (x, y)
full-resolution px of the H&E it is paired with (scverse conventions).

``slide`` opens an image or whole-slide file; ``visium`` a Space Ranger folder; ``visium_hd`` one bin size
of a Space Ranger HD folder (``binned_outputs/square_0XXum``); ``xenium`` a Xenium
output folder (cells registered to the H&E); ``hest`` a HEST-1k sample; ``her2st`` a HER2ST section;
``h5ad`` an h5ad with positions; ``cells`` an h5ad of cells; ``counts`` either an h5ad or a Xenium folder; ``cell_table`` a CSV/TSV/parquet of cell
centroids -> (ids, xy).
"""
from deepspot.io.slides import open_slide as slide
from deepspot.io.spatial import read_cell_table as cell_table
from deepspot.io.spatial import read_cells_h5ad as cells
from deepspot.io.spatial import read_counts as counts
from deepspot.io.spatial import read_her2st as her2st
from deepspot.io.spatial import read_hest as hest
from deepspot.io.spatial import read_spaceranger as visium
from deepspot.io.spatial import read_spatial_h5ad as h5ad
from deepspot.io.spatial import read_xenium as xenium
from deepspot.io.visium_hd import read_visium_hd as visium_hd

__all__ = ["cell_table", "cells", "counts", "h5ad", "her2st", "hest", "slide", "visium", "visium_hd", "xenium"]
