from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    CLIENT_TO_SERVER: _ClassVar[Direction]
    SERVER_TO_CLIENT: _ClassVar[Direction]

class ProtocolType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[ProtocolType]
    HTTP: _ClassVar[ProtocolType]
    GRPC: _ClassVar[ProtocolType]
    WEBSOCKET: _ClassVar[ProtocolType]
    CONTROL: _ClassVar[ProtocolType]
DIRECTION_UNSPECIFIED: Direction
CLIENT_TO_SERVER: Direction
SERVER_TO_CLIENT: Direction
PROTOCOL_UNSPECIFIED: ProtocolType
HTTP: ProtocolType
GRPC: ProtocolType
WEBSOCKET: ProtocolType
CONTROL: ProtocolType

class TunnelFrame(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[TunnelMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[TunnelMessage, _Mapping]]] = ...) -> None: ...

class TunnelMessage(_message.Message):
    __slots__ = ("client_id", "request_id", "direction", "protocol_type", "http_request", "http_response", "grpc_request", "grpc_response", "ws_request", "ws_response", "ws_frame", "config_sync", "config_sync_response", "stream_open", "stream_open_response", "error_message", "heartbeat", "window_update", "trace_id", "window_limited")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_TYPE_FIELD_NUMBER: _ClassVar[int]
    HTTP_REQUEST_FIELD_NUMBER: _ClassVar[int]
    HTTP_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    GRPC_REQUEST_FIELD_NUMBER: _ClassVar[int]
    GRPC_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    WS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    WS_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    WS_FRAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SYNC_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SYNC_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STREAM_OPEN_FIELD_NUMBER: _ClassVar[int]
    STREAM_OPEN_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_UPDATE_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LIMITED_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    request_id: str
    direction: Direction
    protocol_type: ProtocolType
    http_request: HttpRequest
    http_response: HttpResponse
    grpc_request: GrpcRequest
    grpc_response: GrpcResponse
    ws_request: WebSocketRequest
    ws_response: WebSocketResponse
    ws_frame: WebSocketFrame
    config_sync: ConfigSyncRequest
    config_sync_response: ConfigSyncResponse
    stream_open: StreamOpenRequest
    stream_open_response: StreamOpenResponse
    error_message: ErrorMessage
    heartbeat: Heartbeat
    window_update: WindowUpdate
    trace_id: str
    window_limited: bool
    def __init__(self, client_id: _Optional[str] = ..., request_id: _Optional[str] = ..., direction: _Optional[_Union[Direction, str]] = ..., protocol_type: _Optional[_Union[ProtocolType, str]] = ..., http_request: _Optional[_Union[HttpRequest, _Mapping]] = ..., http_response: _Optional[_Union[HttpResponse, _Mapping]] = ..., grpc_request: _Optional[_Union[GrpcRequest, _Mapping]] = ..., grpc_response: _Optional[_Union[GrpcResponse, _Mapping]] = ..., ws_request: _Optional[_Union[WebSocketRequest, _Mapping]] = ..., ws_response: _Optional[_Union[WebSocketResponse, _Mapping]] = ..., ws_frame: _Optional[_Union[WebSocketFrame, _Mapping]] = ..., config_sync: _Optional[_Union[ConfigSyncRequest, _Mapping]] = ..., config_sync_response: _Optional[_Union[ConfigSyncResponse, _Mapping]] = ..., stream_open: _Optional[_Union[StreamOpenRequest, _Mapping]] = ..., stream_open_response: _Optional[_Union[StreamOpenResponse, _Mapping]] = ..., error_message: _Optional[_Union[ErrorMessage, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., window_update: _Optional[_Union[WindowUpdate, _Mapping]] = ..., trace_id: _Optional[str] = ..., window_limited: _Optional[bool] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: bytes
    def __init__(self, name: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class HttpRequest(_message.Message):
    __slots__ = ("method", "url", "host", "path", "query", "headers", "body", "is_first_chunk", "is_last_chunk", "route", "scheme", "remote_addr", "content_length")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    method: str
    url: str
    host: str
    path: str
    query: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    is_first_chunk: bool
    is_last_chunk: bool
    route: str
    scheme: str
    remote_addr: str
    content_length: int
    def __init__(self, method: _Optional[str] = ..., url: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ..., query: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., is_first_chunk: _Optional[bool] = ..., is_last_chunk: _Optional[bool] = ..., route: _Optional[str] = ..., scheme: _Optional[str] = ..., remote_addr: _Optional[str] = ..., content_length: _Optional[int] = ...) -> None: ...

class HttpResponse(_message.Message):
    __slots__ = ("status_code", "headers", "body", "is_first_chunk", "is_last_chunk", "reason")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    is_first_chunk: bool
    is_last_chunk: bool
    reason: str
    def __init__(self, status_code: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., is_first_chunk: _Optional[bool] = ..., is_last_chunk: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class GrpcRequest(_message.Message):
    __slots__ = ("service", "method", "host", "metadata", "body", "is_first_chunk", "is_last_chunk", "route", "timeout", "remote_addr")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    service: str
    method: str
    host: str
    metadata: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    is_first_chunk: bool
    is_last_chunk: bool
    route: str
    timeout: float
    remote_addr: str
    def __init__(self, service: _Optional[str] = ..., method: _Optional[str] = ..., host: _Optional[str] = ..., metadata: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., is_first_chunk: _Optional[bool] = ..., is_last_chunk: _Optional[bool] = ..., route: _Optional[str] = ..., timeout: _Optional[float] = ..., remote_addr: _Optional[str] = ...) -> None: ...

class GrpcResponse(_message.Message):
    __slots__ = ("status_code", "initial_metadata", "body", "is_first_chunk", "is_last_chunk", "details", "trailing_metadata")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_METADATA_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    TRAILING_METADATA_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    initial_metadata: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    is_first_chunk: bool
    is_last_chunk: bool
    details: str
    trailing_metadata: _containers.RepeatedCompositeFieldContainer[Header]
    def __init__(self, status_code: _Optional[int] = ..., initial_metadata: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., is_first_chunk: _Optional[bool] = ..., is_last_chunk: _Optional[bool] = ..., details: _Optional[str] = ..., trailing_metadata: _Optional[_Iterable[_Union[Header, _Mapping]]] = ...) -> None: ...

class WebSocketRequest(_message.Message):
    __slots__ = ("url", "host", "headers", "subprotocols", "route", "scheme", "remote_addr")
    URL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    SUBPROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    url: str
    host: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    subprotocols: _containers.RepeatedScalarFieldContainer[str]
    route: str
    scheme: str
    remote_addr: str
    def __init__(self, url: _Optional[str] = ..., host: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., subprotocols: _Optional[_Iterable[str]] = ..., route: _Optional[str] = ..., scheme: _Optional[str] = ..., remote_addr: _Optional[str] = ...) -> None: ...

class WebSocketResponse(_message.Message):
    __slots__ = ("status_code", "headers", "subprotocol", "accepted", "reason", "body")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    SUBPROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    subprotocol: str
    accepted: bool
    reason: str
    body: bytes
    def __init__(self, status_code: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., subprotocol: _Optional[str] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class WebSocketFrame(_message.Message):
    __slots__ = ("fin", "opcode", "masked", "payload", "close_code", "close_reason")
    FIN_FIELD_NUMBER: _ClassVar[int]
    OPCODE_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CLOSE_CODE_FIELD_NUMBER: _ClassVar[int]
    CLOSE_REASON_FIELD_NUMBER: _ClassVar[int]
    fin: bool
    opcode: int
    masked: bool
    payload: bytes
    close_code: int
    close_reason: str
    def __init__(self, fin: _Optional[bool] = ..., opcode: _Optional[int] = ..., masked: _Optional[bool] = ..., payload: _Optional[bytes] = ..., close_code: _Optional[int] = ..., close_reason: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("name", "host", "path_prefix", "backend", "set_host", "timeout", "grpc_service", "max_message_size", "max_body_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_PREFIX_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SET_HOST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    GRPC_SERVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BODY_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    path_prefix: str
    backend: str
    set_host: str
    timeout: float
    grpc_service: str
    max_message_size: int
    max_body_size: int
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., path_prefix: _Optional[str] = ..., backend: _Optional[str] = ..., set_host: _Optional[str] = ..., timeout: _Optional[float] = ..., grpc_service: _Optional[str] = ..., max_message_size: _Optional[int] = ..., max_body_size: _Optional[int] = ...) -> None: ...

class ConfigSyncRequest(_message.Message):
    __slots__ = ("config_version",)
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    config_version: str
    def __init__(self, config_version: _Optional[str] = ...) -> None: ...

class ConfigSyncResponse(_message.Message):
    __slots__ = ("config_version", "routes")
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    config_version: str
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, config_version: _Optional[str] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class StreamOpenRequest(_message.Message):
    __slots__ = ("client_id", "group", "version", "stream_id", "token", "max_concurrency")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    group: str
    version: str
    stream_id: str
    token: str
    max_concurrency: int
    def __init__(self, client_id: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., stream_id: _Optional[str] = ..., token: _Optional[str] = ..., max_concurrency: _Optional[int] = ...) -> None: ...

class StreamOpenResponse(_message.Message):
    __slots__ = ("success", "message", "config", "window")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    config: ConfigSyncResponse
    window: int
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., config: _Optional[_Union[ConfigSyncResponse, _Mapping]] = ..., window: _Optional[int] = ...) -> None: ...

class ErrorMessage(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at_ms", "ack")
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    sent_at_ms: int
    ack: bool
    def __init__(self, sent_at_ms: _Optional[int] = ..., ack: _Optional[bool] = ...) -> None: ...

class WindowUpdate(_message.Message):
    __slots__ = ("increment", "grow")
    INCREMENT_FIELD_NUMBER: _ClassVar[int]
    GROW_FIELD_NUMBER: _ClassVar[int]
    increment: int
    grow: int
    def __init__(self, increment: _Optional[int] = ..., grow: _Optional[int] = ...) -> None: ...
