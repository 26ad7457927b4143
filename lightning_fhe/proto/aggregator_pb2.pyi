from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("weight", "encrypted_layout_json", "plaintext_layout_json", "he_fingerprint", "params_fingerprint", "max_wait_s", "rounds", "mask_key", "require_masking")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    HE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_MASKING_FIELD_NUMBER: _ClassVar[int]
    weight: float
    encrypted_layout_json: str
    plaintext_layout_json: str
    he_fingerprint: str
    params_fingerprint: str
    max_wait_s: float
    rounds: int
    mask_key: MaskAnnouncement
    require_masking: bool
    def __init__(self, weight: _Optional[float] = ..., encrypted_layout_json: _Optional[str] = ..., plaintext_layout_json: _Optional[str] = ..., he_fingerprint: _Optional[str] = ..., params_fingerprint: _Optional[str] = ..., max_wait_s: _Optional[float] = ..., rounds: _Optional[int] = ..., mask_key: _Optional[_Union[MaskAnnouncement, _Mapping]] = ..., require_masking: _Optional[bool] = ...) -> None: ...

class MaskAnnouncement(_message.Message):
    __slots__ = ("site", "certificate", "public_key", "signature", "key_fingerprint")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    site: str
    certificate: bytes
    public_key: bytes
    signature: bytes
    key_fingerprint: str
    def __init__(self, site: _Optional[str] = ..., certificate: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_fingerprint: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("formed", "site", "members", "total_weight", "share", "rounds", "current_round", "send_initial_model", "joined", "expected", "masked", "mask_keys", "federation_instance")
    FORMED_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    MASK_KEYS_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    formed: bool
    site: str
    members: _containers.RepeatedScalarFieldContainer[str]
    total_weight: float
    share: float
    rounds: int
    current_round: int
    send_initial_model: bool
    joined: int
    expected: int
    masked: bool
    mask_keys: _containers.RepeatedCompositeFieldContainer[MaskAnnouncement]
    federation_instance: str
    def __init__(self, formed: _Optional[bool] = ..., site: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., total_weight: _Optional[float] = ..., share: _Optional[float] = ..., rounds: _Optional[int] = ..., current_round: _Optional[int] = ..., send_initial_model: _Optional[bool] = ..., joined: _Optional[int] = ..., expected: _Optional[int] = ..., masked: _Optional[bool] = ..., mask_keys: _Optional[_Iterable[_Union[MaskAnnouncement, _Mapping]]] = ..., federation_instance: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "num_chunks", "plaintext_count", "attempt")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_chunks: int
    plaintext_count: int
    attempt: int
    def __init__(self, round: _Optional[int] = ..., num_chunks: _Optional[int] = ..., plaintext_count: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PlaintextBlock(_message.Message):
    __slots__ = ("offset", "float64_le", "float32_le")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FLOAT64_LE_FIELD_NUMBER: _ClassVar[int]
    FLOAT32_LE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    float64_le: bytes
    float32_le: bytes
    def __init__(self, offset: _Optional[int] = ..., float64_le: _Optional[bytes] = ..., float32_le: _Optional[bytes] = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("header", "plaintext", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    plaintext: PlaintextBlock
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., plaintext: _Optional[_Union[PlaintextBlock, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("round", "bytes_received", "submitted", "members")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    bytes_received: int
    submitted: int
    members: int
    def __init__(self, round: _Optional[int] = ..., bytes_received: _Optional[int] = ..., submitted: _Optional[int] = ..., members: _Optional[int] = ...) -> None: ...

class GlobalModelRequest(_message.Message):
    __slots__ = ("round", "max_wait_s")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    max_wait_s: float
    def __init__(self, round: _Optional[int] = ..., max_wait_s: _Optional[float] = ...) -> None: ...

class GlobalModelHeader(_message.Message):
    __slots__ = ("round", "num_chunks", "plaintext_count", "total_share", "participants", "encrypted_layout_json", "plaintext_layout_json")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SHARE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_chunks: int
    plaintext_count: int
    total_share: float
    participants: _containers.RepeatedScalarFieldContainer[str]
    encrypted_layout_json: str
    plaintext_layout_json: str
    def __init__(self, round: _Optional[int] = ..., num_chunks: _Optional[int] = ..., plaintext_count: _Optional[int] = ..., total_share: _Optional[float] = ..., participants: _Optional[_Iterable[str]] = ..., encrypted_layout_json: _Optional[str] = ..., plaintext_layout_json: _Optional[str] = ...) -> None: ...

class GlobalModelPart(_message.Message):
    __slots__ = ("pending", "header", "chunk", "plaintext")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    pending: RoundStatus
    header: GlobalModelHeader
    chunk: Chunk
    plaintext: PlaintextBlock
    def __init__(self, pending: _Optional[_Union[RoundStatus, _Mapping]] = ..., header: _Optional[_Union[GlobalModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., plaintext: _Optional[_Union[PlaintextBlock, _Mapping]] = ...) -> None: ...

class RoundStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("why",)
    WHY_FIELD_NUMBER: _ClassVar[int]
    why: str
    def __init__(self, why: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("members_left",)
    MEMBERS_LEFT_FIELD_NUMBER: _ClassVar[int]
    members_left: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, members_left: _Optional[_Iterable[str]] = ...) -> None: ...

class MemberActivity(_message.Message):
    __slots__ = ("site", "idle_s", "last_call")
    SITE_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    LAST_CALL_FIELD_NUMBER: _ClassVar[int]
    site: str
    idle_s: float
    last_call: str
    def __init__(self, site: _Optional[str] = ..., idle_s: _Optional[float] = ..., last_call: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("phase", "current_round", "rounds", "last_closed_round", "members", "submitted", "this_site_submitted", "failure", "joined", "seconds_left", "activity", "left", "site", "attempt", "attempt_members", "federation_instance")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[RoundStatus.Phase]
        FORMING: _ClassVar[RoundStatus.Phase]
        OPEN: _ClassVar[RoundStatus.Phase]
        FINISHED: _ClassVar[RoundStatus.Phase]
        FAILED: _ClassVar[RoundStatus.Phase]
    PHASE_UNSPECIFIED: RoundStatus.Phase
    FORMING: RoundStatus.Phase
    OPEN: RoundStatus.Phase
    FINISHED: RoundStatus.Phase
    FAILED: RoundStatus.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LAST_CLOSED_ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    THIS_SITE_SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    phase: RoundStatus.Phase
    current_round: int
    rounds: int
    last_closed_round: int
    members: _containers.RepeatedScalarFieldContainer[str]
    submitted: _containers.RepeatedScalarFieldContainer[str]
    this_site_submitted: bool
    failure: str
    joined: _containers.RepeatedScalarFieldContainer[str]
    seconds_left: float
    activity: _containers.RepeatedCompositeFieldContainer[MemberActivity]
    left: _containers.RepeatedScalarFieldContainer[str]
    site: str
    attempt: int
    attempt_members: _containers.RepeatedScalarFieldContainer[str]
    federation_instance: str
    def __init__(self, phase: _Optional[_Union[RoundStatus.Phase, str]] = ..., current_round: _Optional[int] = ..., rounds: _Optional[int] = ..., last_closed_round: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., submitted: _Optional[_Iterable[str]] = ..., this_site_submitted: _Optional[bool] = ..., failure: _Optional[str] = ..., joined: _Optional[_Iterable[str]] = ..., seconds_left: _Optional[float] = ..., activity: _Optional[_Iterable[_Union[MemberActivity, _Mapping]]] = ..., left: _Optional[_Iterable[str]] = ..., site: _Optional[str] = ..., attempt: _Optional[int] = ..., attempt_members: _Optional[_Iterable[str]] = ..., federation_instance: _Optional[str] = ...) -> None: ...

class SealedKey(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext", "key_fingerprint", "offset", "size")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    ciphertext: bytes
    key_fingerprint: str
    offset: int
    size: int
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., ciphertext: _Optional[bytes] = ..., key_fingerprint: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class SealedKeysReply(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class FetchSealedKeyRequest(_message.Message):
    __slots__ = ("max_wait_s",)
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    max_wait_s: float
    def __init__(self, max_wait_s: _Optional[float] = ...) -> None: ...
