from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    INT64: _ClassVar[DataType]

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_UNSPECIFIED: _ClassVar[PixelFormat]
    RGB8: _ClassVar[PixelFormat]
    BGR8: _ClassVar[PixelFormat]
    RGBA8: _ClassVar[PixelFormat]
    BGRA8: _ClassVar[PixelFormat]
    MONO8: _ClassVar[PixelFormat]
    YUYV: _ClassVar[PixelFormat]
    NV12: _ClassVar[PixelFormat]
    I420: _ClassVar[PixelFormat]

class CamSpace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAM_SPACE_UNSPECIFIED: _ClassVar[CamSpace]
    FEATURE_MAP: _ClassVar[CamSpace]
    MODEL_INPUT: _ClassVar[CamSpace]
    ORIGINAL_IMAGE: _ClassVar[CamSpace]
    NO_MAP: _ClassVar[CamSpace]

class LayerFusion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYER_FUSION_UNSPECIFIED: _ClassVar[LayerFusion]
    MEAN: _ClassVar[LayerFusion]
    SUM: _ClassVar[LayerFusion]
    MAX: _ClassVar[LayerFusion]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
UINT8: DataType
INT64: DataType
PIXEL_FORMAT_UNSPECIFIED: PixelFormat
RGB8: PixelFormat
BGR8: PixelFormat
RGBA8: PixelFormat
BGRA8: PixelFormat
MONO8: PixelFormat
YUYV: PixelFormat
NV12: PixelFormat
I420: PixelFormat
CAM_SPACE_UNSPECIFIED: CamSpace
FEATURE_MAP: CamSpace
MODEL_INPUT: CamSpace
ORIGINAL_IMAGE: CamSpace
NO_MAP: CamSpace
LAYER_FUSION_UNSPECIFIED: LayerFusion
MEAN: LayerFusion
SUM: LayerFusion
MAX: LayerFusion

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("height", "width", "pixels", "format", "step")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    pixels: bytes
    format: PixelFormat
    step: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., pixels: _Optional[bytes] = ..., format: _Optional[_Union[PixelFormat, str]] = ..., step: _Optional[int] = ...) -> None: ...

class RegionOptions(_message.Message):
    __slots__ = ("enabled", "threshold", "max_regions", "min_area")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_REGIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_AREA_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    threshold: float
    max_regions: int
    min_area: float
    def __init__(self, enabled: _Optional[bool] = ..., threshold: _Optional[float] = ..., max_regions: _Optional[int] = ..., min_area: _Optional[float] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("space", "dtype", "include_logits", "include_activations", "include_gradients", "regions")
    SPACE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    space: CamSpace
    dtype: DataType
    include_logits: bool
    include_activations: bool
    include_gradients: bool
    regions: RegionOptions
    def __init__(self, space: _Optional[_Union[CamSpace, str]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., include_logits: _Optional[bool] = ..., include_activations: _Optional[bool] = ..., include_gradients: _Optional[bool] = ..., regions: _Optional[_Union[RegionOptions, _Mapping]] = ...) -> None: ...

class Smoothing(_message.Message):
    __slots__ = ("noise_samples", "noise_sigma", "horizontal_flip", "seed")
    NOISE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_SIGMA_FIELD_NUMBER: _ClassVar[int]
    HORIZONTAL_FLIP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    noise_samples: int
    noise_sigma: float
    horizontal_flip: bool
    seed: int
    def __init__(self, noise_samples: _Optional[int] = ..., noise_sigma: _Optional[float] = ..., horizontal_flip: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class IntegratedGradients(_message.Message):
    __slots__ = ("steps", "baseline")
    class Baseline(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        BASELINE_UNSPECIFIED: _ClassVar[IntegratedGradients.Baseline]
        BLACK: _ClassVar[IntegratedGradients.Baseline]
        ZERO: _ClassVar[IntegratedGradients.Baseline]
    BASELINE_UNSPECIFIED: IntegratedGradients.Baseline
    BLACK: IntegratedGradients.Baseline
    ZERO: IntegratedGradients.Baseline
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    baseline: IntegratedGradients.Baseline
    def __init__(self, steps: _Optional[int] = ..., baseline: _Optional[_Union[IntegratedGradients.Baseline, str]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "request_id", "encoded", "pixels", "tensor", "classes", "top_k", "method", "layers", "fusion", "output", "smoothing", "raw_maps", "integrated_gradients", "stream", "window")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    RAW_MAPS_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    encoded: bytes
    pixels: RawImage
    tensor: Tensor
    classes: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    method: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    fusion: LayerFusion
    output: OutputOptions
    smoothing: Smoothing
    raw_maps: bool
    integrated_gradients: IntegratedGradients
    stream: StreamOptions
    window: IntensityWindow
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., encoded: _Optional[bytes] = ..., pixels: _Optional[_Union[RawImage, _Mapping]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., classes: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., method: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., fusion: _Optional[_Union[LayerFusion, str]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., smoothing: _Optional[_Union[Smoothing, _Mapping]] = ..., raw_maps: _Optional[bool] = ..., integrated_gradients: _Optional[_Union[IntegratedGradients, _Mapping]] = ..., stream: _Optional[_Union[StreamOptions, _Mapping]] = ..., window: _Optional[_Union[IntensityWindow, _Mapping]] = ...) -> None: ...

class IntensityWindow(_message.Message):
    __slots__ = ("center", "width")
    CENTER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    center: float
    width: float
    def __init__(self, center: _Optional[float] = ..., width: _Optional[float] = ...) -> None: ...

class StreamOptions(_message.Message):
    __slots__ = ("latest_frame_wins", "frame_deadline_ms", "temporal_smoothing", "scene_change_correlation", "reset")
    LATEST_FRAME_WINS_FIELD_NUMBER: _ClassVar[int]
    FRAME_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    SCENE_CHANGE_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    latest_frame_wins: bool
    frame_deadline_ms: int
    temporal_smoothing: float
    scene_change_correlation: float
    reset: bool
    def __init__(self, latest_frame_wins: _Optional[bool] = ..., frame_deadline_ms: _Optional[int] = ..., temporal_smoothing: _Optional[float] = ..., scene_change_correlation: _Optional[float] = ..., reset: _Optional[bool] = ...) -> None: ...

class StreamStats(_message.Message):
    __slots__ = ("frames_received", "frames_explained", "frames_skipped", "frames_failed", "latency_p50_ms", "latency_p99_ms")
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_EXPLAINED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FAILED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    frames_received: int
    frames_explained: int
    frames_skipped: int
    frames_failed: int
    latency_p50_ms: float
    latency_p99_ms: float
    def __init__(self, frames_received: _Optional[int] = ..., frames_explained: _Optional[int] = ..., frames_skipped: _Optional[int] = ..., frames_failed: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("class_index", "label", "logit", "probability", "cam", "regions")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    CAM_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    logit: float
    probability: float
    cam: Tensor
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., logit: _Optional[float] = ..., probability: _Optional[float] = ..., cam: _Optional[_Union[Tensor, _Mapping]] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("polygon", "box", "area", "peak")
    POLYGON_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    PEAK_FIELD_NUMBER: _ClassVar[int]
    polygon: _containers.RepeatedCompositeFieldContainer[Point]
    box: Box
    area: float
    peak: float
    def __init__(self, polygon: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., area: _Optional[float] = ..., peak: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class Geometry(_message.Message):
    __slots__ = ("original_height", "original_width", "resized_height", "resized_width", "crop")
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZED_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESIZED_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    original_height: int
    original_width: int
    resized_height: int
    resized_width: int
    crop: Box
    def __init__(self, original_height: _Optional[int] = ..., original_width: _Optional[int] = ..., resized_height: _Optional[int] = ..., resized_width: _Optional[int] = ..., crop: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_us", "preprocess_us", "inference_us", "postprocess_us")
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    decode_us: int
    preprocess_us: int
    inference_us: int
    postprocess_us: int
    def __init__(self, decode_us: _Optional[int] = ..., preprocess_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., postprocess_us: _Optional[int] = ...) -> None: ...

class RawTensors(_message.Message):
    __slots__ = ("logits", "activations", "gradients")
    class ActivationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    activations: _containers.MessageMap[str, Tensor]
    gradients: _containers.MessageMap[str, Tensor]
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., activations: _Optional[_Mapping[str, Tensor]] = ..., gradients: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model", "model_version", "method", "layers", "targets", "geometry", "timings", "raw", "error", "skipped", "skip_reason", "stream_stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SKIP_REASON_FIELD_NUMBER: _ClassVar[int]
    STREAM_STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    model_version: str
    method: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    geometry: Geometry
    timings: Timings
    raw: RawTensors
    error: Error
    skipped: bool
    skip_reason: str
    stream_stats: StreamStats
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., method: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., raw: _Optional[_Union[RawTensors, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., skipped: _Optional[bool] = ..., skip_reason: _Optional[str] = ..., stream_stats: _Optional[_Union[StreamStats, _Mapping]] = ...) -> None: ...

class ReloadModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadModelsResponse(_message.Message):
    __slots__ = ("loaded", "refused")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedScalarFieldContainer[str]
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loaded: _Optional[_Iterable[str]] = ..., refused: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("resize", "crop_height", "crop_width", "mean", "std", "scale", "channel_order", "interpolation", "grayscale")
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CROP_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    GRAYSCALE_FIELD_NUMBER: _ClassVar[int]
    resize: int
    crop_height: int
    crop_width: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    scale: float
    channel_order: str
    interpolation: str
    grayscale: str
    def __init__(self, resize: _Optional[int] = ..., crop_height: _Optional[int] = ..., crop_width: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., scale: _Optional[float] = ..., channel_order: _Optional[str] = ..., interpolation: _Optional[str] = ..., grayscale: _Optional[str] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "architecture", "labels", "input_shape", "preprocessing", "layers", "methods", "contract_version", "execution_provider", "camserve_version", "pixel_formats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    CAMSERVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PIXEL_FORMATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    architecture: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    preprocessing: Preprocessing
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    methods: _containers.RepeatedScalarFieldContainer[str]
    contract_version: int
    execution_provider: str
    camserve_version: str
    pixel_formats: _containers.RepeatedScalarFieldContainer[PixelFormat]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., methods: _Optional[_Iterable[str]] = ..., contract_version: _Optional[int] = ..., execution_provider: _Optional[str] = ..., camserve_version: _Optional[str] = ..., pixel_formats: _Optional[_Iterable[_Union[PixelFormat, str]]] = ...) -> None: ...
