let interpreter = try Interpreter(modelPath: Bundle.main.path(forResource: "model", ofType: "tflite")!)
let runner = try interpreter.signatureRunner(with: "{{signature}}")
try runner.allocateTensors()
try runner.invoke(with: ["image": pixels])   // Data: {{size}}x{{size}}x3 {{input_dtype}} RGB, row-major
let mel = try runner.output(named: "melanoma")    // {{melanoma_dtype}}
let dx = try runner.output(named: "diagnosis")    // {{output_dtype}}, {{n_classes}} values
let pMelanoma = {{read_melanoma_swift}}{{dequantize_comment}}
let isMelanoma = pMelanoma >= {{threshold}}
