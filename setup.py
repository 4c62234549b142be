"""medfeat: a compiled feature engine for medical imaging research."""
from setuptools import find_packages, setup

RUNTIME = [
    # torch and torchvision are installed first and pinned by the Makefile
    # (see constraints.txt), so no dependency below can pull another build.
    "torch>=2.8",
    "torchvision",
    "numpy>=1.26",
    "scipy>=1.11",
    "nibabel>=5",
    "isal>=1.6",  # ISA-L's igzip: faster .nii.gz inflate
    "xxhash>=3",  # source-file signatures of feature-store items
    "pydicom>=3",
    # pydicom's pixel-data plugins: JPEG and JPEG-LS (compressed DICOM as PACS export it)
    "pylibjpeg>=2",
    "pylibjpeg-libjpeg>=2.1",
    "pillow>=10",
    "zarr>=3",
    "numcodecs>=0.13",
    "dask[distributed]>=2024.8",
    "numba>=0.60",
    "scikit-learn>=1.4",
    "threadpoolctl>=3",
    "ml_dtypes>=0.4",
    "pandas>=2",
    "pyarrow>=14",
    "h5py>=3.10",
    "matplotlib>=3.8",
    "pyyaml>=6",
    "click>=8.1",
    "psutil>=5.9",
    "onnx>=1.16",
    "onnxruntime>=1.18",
    "onnxscript>=0.1",
    "safetensors>=0.4",
    "monai>=1.4",
    "einops>=0.8",
    "timm>=1.0",
    "open_clip_torch>=2.24",
]

EXTRAS = {
    # CuPy for CUDA 12; on CUDA 13 machines install cupy-cuda13x instead.
    "gpu": ["cupy-cuda12x", "onnxruntime-gpu"],
    "tensorrt": ["tensorrt"],
    "test": [
        "pytest>=8",
        "pytest-timeout",
        "ruff>=0.6",
        "mypy>=1.10",
        "types-PyYAML",
        "hypothesis>=6",
        "SimpleITK>=2.3",
        "segment_anything",
        "transformers>=4.40",
        "xarray",  # medfeat.api Store.to_xarray
    ],
    # Upstream implementations, imported only by the parity suite (tests/parity), never by
    # medfeat: uniGradICON (pulls ITK, ~1.5 GB), SAM-Med3D's encoder (medim), SAM, DINOv2
    # (transformers). timm, open_clip and MONAI are runtime dependencies already. BLIP, SEEM
    # and the original DINO / DINOv2 code install from no index: fixtures (tests/parity/fixtures).
    "parity": ["unigradicon", "medim", "segment_anything", "transformers>=4.40"],
}

setup(
    name="medfeat",
    version="0.1.0",
    description="High-throughput foundation-model features and linear probes for medical imaging",
    packages=find_packages(include=["medfeat", "medfeat.*"]),
    package_data={"medfeat.kernels": ["cuda/*.cu"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["medfeat=medfeat.cli:main"]},
)
