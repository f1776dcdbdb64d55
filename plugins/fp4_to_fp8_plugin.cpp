// fp-export TensorRT plugin: Fp4ToFp8 (namespace "fp_export", version "1"), an IPluginV3.
//
// Inputs: packed FP4 codes uint8 [rows, cols/2] and per-group shifts int8 [rows, ceil(cols/group)];
// attribute group_size (int32). Output: FP8 E4M3 [rows, cols], the exact product
// fp4 * 2^shift (fp_export/numerics/fp4_to_fp8.py). The ONNX node of the same name, domain and
// plugin_version/plugin_namespace attributes (fp_export/export/onnx.py) resolves to this
// creator through TensorRT's plugin registry. The kernel is fp4_to_fp8.cu, shared with the
// Python runtime through its C entry point.
#include "fp4_to_fp8.h"

#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

constexpr char const* kNAME = "Fp4ToFp8";
constexpr char const* kVERSION = "1";
constexpr char const* kNAMESPACE = "fp_export";

class Fp4ToFp8Plugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit Fp4ToFp8Plugin(int32_t group) : mGroup(group) {
    mField = PluginField("group_size", &mGroup, PluginFieldType::kINT32, 1);
    mFields.nbFields = 1;
    mFields.fields = &mField;
  }

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override { return new Fp4ToFp8Plugin(mGroup); }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kNAME; }
  char const* getPluginVersion() const noexcept override { return kVERSION; }
  char const* getPluginNamespace() const noexcept override { return kNAMESPACE; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }

  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override {
    return (nbInputs == 2 && nbOutputs == 1) ? 0 : 1;
  }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs != 2) return 1;
    outputTypes[0] = DataType::kFP8;
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                          IExprBuilder& exprBuilder) noexcept override {
    if (nbInputs != 2 || nbOutputs != 1 || inputs[0].nbDims != 2) return 1;
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = exprBuilder.operation(DimensionOperation::kPROD, *inputs[0].d[1], *exprBuilder.constant(2));
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    static DataType const kTypes[3] = {DataType::kUINT8, DataType::kINT8, DataType::kFP8};
    return pos < 3 && inOut[pos].desc.format == TensorFormat::kLINEAR && inOut[pos].desc.type == kTypes[pos];
  }

  char const* getTimingCacheID() noexcept override {
    mCacheId = std::string(kNAME) + "_g" + std::to_string(mGroup);
    return mCacheId.c_str();
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override {
    int64_t const cols = in[0].dims.d[1] * 2;  // ceil(cols / group) shifts per row: the last group may be partial
    return (in[0].dims.nbDims == 2 && in[1].dims.d[1] == (cols + mGroup - 1) / mGroup) ? 0 : 1;
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    int64_t const rows = inputDesc[0].dims.d[0];
    int64_t const cols = inputDesc[0].dims.d[1] * 2;
    return fp_export_fp4_to_fp8(static_cast<uint8_t const*>(inputs[0]), static_cast<int8_t const*>(inputs[1]),
                                static_cast<uint8_t*>(outputs[0]), rows, cols, mGroup, stream);
  }

  IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mFields; }

 private:
  int32_t mGroup;
  PluginField mField;
  PluginFieldCollection mFields{};
  std::string mCacheId;
};

class Fp4ToFp8Creator : public IPluginCreatorV3One {
 public:
  Fp4ToFp8Creator() {
    mAttrs.emplace_back("group_size", nullptr, PluginFieldType::kINT32, 1);
    mFields.nbFields = static_cast<int32_t>(mAttrs.size());
    mFields.fields = mAttrs.data();
  }
  char const* getPluginName() const noexcept override { return kNAME; }
  char const* getPluginVersion() const noexcept override { return kVERSION; }
  char const* getPluginNamespace() const noexcept override { return kNAMESPACE; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &mFields; }

  IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override {
    int32_t group = -1;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      if (std::strcmp(fc->fields[i].name, "group_size") == 0 && fc->fields[i].type == PluginFieldType::kINT32) {
        group = *static_cast<int32_t const*>(fc->fields[i].data);
      }
    }
    if (group <= 0 || group % 2) return nullptr;
    return new Fp4ToFp8Plugin(group);
  }

 private:
  std::vector<PluginField> mAttrs;
  PluginFieldCollection mFields{};
};

}  // namespace

// Entry points TensorRT looks up when it loads this library (IPluginRegistry::loadLibrary,
// trtexec --staticPlugins, polygraphy --plugins).
extern "C" {
void setLoggerFinder(ILoggerFinder* finder) {}

IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static Fp4ToFp8Creator creator;
  static IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
}
