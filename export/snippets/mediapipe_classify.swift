let options = ImageClassifierOptions()
options.baseOptions.modelAssetPath = Bundle.main.path(forResource: "model", ofType: "tflite")!
let classifier = try ImageClassifier(options: options)
let image = try MPImage(uiImage: photo)               // keeps photo.imageOrientation
let w = Double(image.width), h = Double(image.height), side = min(w, h)
let roi = CGRect(x: floor((w - side) / 2) / w, y: floor((h - side) / 2) / h,
                 width: side / w, height: side / h)
let result = try classifier.classify(image: image, regionOfInterest: roi)
let heads = Dictionary(uniqueKeysWithValues:
    result.classificationResult.classifications.map { ($0.headName ?? "", $0.categories) })
let pMelanoma = heads["melanoma"]![0].score
let isMelanoma = pMelanoma >= {{threshold}}                      // the app applies the model's threshold
let diagnosis = heads["diagnosis"]!.max { $0.score < $1.score }!.categoryName
