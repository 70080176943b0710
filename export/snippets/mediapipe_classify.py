# pip install mediapipe==0.10.21   (python mediapipe_classify.py BUNDLE_DIR photo.jpg ...)
import json
import sys
from pathlib import Path

import mediapipe as mp
from mediapipe.tasks.python import BaseOptions, vision
from mediapipe.tasks.python.components.containers.rect import Rect

bundle = Path(sys.argv[1])
card = json.loads((bundle / "model_card.json").read_text())
threshold = card["heads"]["melanoma"]["threshold"]  # MediaPipe does not apply it: the app does
classifier = vision.ImageClassifier.create_from_options(vision.ImageClassifierOptions(
    base_options=BaseOptions(model_asset_path=str(bundle / "model.tflite"))))
for photo in sys.argv[2:]:
    image = mp.Image.create_from_file(photo)  # upright RGB (MediaPipe ignores EXIF orientation)
    w, h = image.width, image.height
    s = min(w, h)  # the centred square, as the model was trained: MediaPipe would stretch
    left, top = (w - s) // 2, (h - s) // 2
    roi = Rect(left=left / w, top=top / h, right=(left + s) / w, bottom=(top + s) / h)
    result = classifier.classify(image, vision.ImageProcessingOptions(region_of_interest=roi))
    heads = {c.head_name: c.categories for c in result.classifications}
    p = heads["melanoma"][0].score
    print(json.dumps({"photo": photo, "melanoma": p, "is_melanoma": p >= threshold,
                      "diagnosis": {c.category_name: c.score for c in
                                    sorted(heads["diagnosis"], key=lambda c: c.index)}}))
