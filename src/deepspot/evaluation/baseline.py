"""The baseline the field uses: (optional PCA) + ridge regression on the same features (scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def ridge_baseline(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, pca_dims: int | None = 256,
                   alphas=(0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0), seed: int = 2024) -> np.ndarray:
    """Fit on train, predict test: (N_test, G). PCA to ``pca_dims`` (capped by samples) as in HEST-Bench."""
    steps = [StandardScaler()]
    if pca_dims is not None:
        k = int(min(pca_dims, x_train.shape[0] - 1, x_train.shape[1]))
        if k >= 1:
            steps.append(PCA(n_components=k, random_state=seed))
    steps.append(RidgeCV(alphas=alphas))
    model = make_pipeline(*steps)
    model.fit(x_train, y_train)
    return np.asarray(model.predict(x_test), dtype=np.float32)
