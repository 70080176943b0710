val model = Model.newInstance(context)
val side = minOf(bitmap.width, bitmap.height)
val square = Bitmap.createBitmap(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side)
val outputs = model.process(TensorImage.fromBitmap(square))
val pMelanoma = outputs.melanomaAsCategoryList[0].score
val isMelanoma = pMelanoma >= {{threshold}}f
val diagnosis = outputs.diagnosisAsCategoryList.maxBy { it.score }.label
model.close()
