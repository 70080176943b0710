val interpreter = Interpreter(FileUtil.loadMappedFile(context, "model.tflite"))
val S = {{size}}
val input = {{input_buffer_kotlin}}.order(ByteOrder.nativeOrder())
// fill `input` with the centred-square, resized RGB pixels, row-major, R,G,B per pixel ({{input_dtype}})
val melanoma = ByteBuffer.allocateDirect({{melanoma_bytes}}).order(ByteOrder.nativeOrder())
val diagnosis = ByteBuffer.allocateDirect({{diagnosis_bytes}}).order(ByteOrder.nativeOrder())
interpreter.runSignature(mapOf("image" to input),
                         mapOf("melanoma" to melanoma, "diagnosis" to diagnosis), "{{signature}}")
melanoma.rewind()
val pMelanoma = {{read_melanoma_kotlin}}{{dequantize_comment}}
val isMelanoma = pMelanoma >= {{threshold}}f
