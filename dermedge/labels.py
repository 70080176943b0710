"""The names every artifact uses, each defined once: the diagnosis labels and their order, the
two heads, the model's input and its TFLite signature."""

# HAM10000 diagnosis codes in the order of the `diagnosis` head (alphabetical, as in the
# HAM10000 release). Recorded in every run's model card; consumers read it from there.
DIAGNOSIS_LABELS: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

DIAGNOSIS_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}

# The `melanoma` head is one sigmoid unit: P(dx == "mel").
MELANOMA_LABELS: tuple[str, ...] = ("melanoma",)
MELANOMA_DX = "mel"

# Column order of the ISIC 2018 Task 3 ground-truth and submission CSVs.
ISIC_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_TO_DX: dict[str, str] = {c: c.lower() for c in ISIC_COLUMNS}
DX_TO_ISIC: dict[str, str] = {v: k for k, v in ISIC_TO_DX.items()}

# The model contract (docs/ARTIFACTS.md): one input of raw RGB pixels, two named heads, and
# the TFLite signature that exposes them by name.
INPUT_NAME = "image"
HEADS: tuple[str, ...] = ("melanoma", "diagnosis")
SIGNATURE = "serving_default"
# A named output a model may add beside the heads (docs/ARTIFACTS.md): the input gate's
# atypicality score in [0, 1], "this does not look like a dermoscopy photo" (export/gate.py).
# Bundles without it load; the gate then checks photo quality only.
OOD = "ood"
OOD_LABELS: tuple[str, ...] = ("not_dermoscopy",)
OPTIONAL_OUTPUTS: tuple[str, ...] = (OOD,)
