import { FilesetResolver, ImageClassifier } from "@mediapipe/tasks-vision";
const vision = await FilesetResolver.forVisionTasks(
  "https://cdn.jsdelivr.net/npm/@mediapipe/tasks-vision@0.10.21/wasm");
const classifier = await ImageClassifier.createFromOptions(vision, {
  baseOptions: { modelAssetPath: "model.tflite" }, runningMode: "IMAGE" });
const img = document.getElementById("photo");           // a loaded <img>
const w = img.naturalWidth, h = img.naturalHeight, side = Math.min(w, h);
const left = Math.floor((w - side) / 2), top = Math.floor((h - side) / 2);
const result = classifier.classify(img, { regionOfInterest:
  { left: left / w, top: top / h, right: (left + side) / w, bottom: (top + side) / h } });
const heads = Object.fromEntries(result.classifications.map(c => [c.headName, c.categories]));
const pMelanoma = heads.melanoma[0].score;
const isMelanoma = pMelanoma >= {{threshold}};                   // the app applies the model's threshold
