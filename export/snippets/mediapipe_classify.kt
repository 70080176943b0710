val classifier = ImageClassifier.createFromOptions(context,
    ImageClassifier.ImageClassifierOptions.builder()
        .setBaseOptions(BaseOptions.builder().setModelAssetPath("model.tflite").build())
        .build())
// bitmap: upright RGB (ImageDecoder applies the EXIF orientation)
val w = bitmap.width; val h = bitmap.height; val side = minOf(w, h)
val left = (w - side) / 2; val top = (h - side) / 2
val roi = RectF(left / w.toFloat(), top / h.toFloat(), (left + side) / w.toFloat(), (top + side) / h.toFloat())
val result = classifier.classify(BitmapImageBuilder(bitmap).build(),
    ImageProcessingOptions.builder().setRegionOfInterest(roi).build())
val heads = result.classificationResult().classifications().associateBy { it.headName().get() }
val pMelanoma = heads.getValue("melanoma").categories()[0].score()
val isMelanoma = pMelanoma >= {{threshold}}f                      // the app applies the model's threshold
val diagnosis = heads.getValue("diagnosis").categories().maxBy { it.score() }.categoryName()
