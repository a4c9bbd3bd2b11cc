"""The wire format: the one package both the client and the server import.

Everything that crosses the connection is built and read here, so the two ends cannot drift
apart. This package must stay importable without torch: the client never has it. Its modules:
:mod:`.bodies` (the request bodies), :mod:`.chat` (``/chat``'s body), :mod:`.rest` (tensor maps,
load progress, error bodies), :mod:`.generate_stream` (``/ws/generate`` messages), :mod:`.frames`
(session frames as messages),
:mod:`.messages` (each session frame kind), :mod:`.codes` (error codes, the error frame),
:mod:`.pickling` (values), :mod:`.errors` (a payload that breaks the format).

Formats: the HTTP bodies and ``/ws/generate`` in the modules named above; ``/ws/session``
frames (SPEC 4), below.

The session channel
-------------------
Frames (:mod:`.frames`) carry a header and buffers; values are pickled by :mod:`.pickling`.
Each kind below has one constructor and one reader in :mod:`.messages` (``error`` in :mod:`.codes`).

Client -> server (``id`` is the client's request number, increasing within a session; every
request carries ``ack``, the last server frame the client has, so the server can forget it):

=============  ==========================================================================
``hello``      first frame: ``session`` (id to resume, or None), ``last_seq`` (last server
               frame seen), ``python`` ("3.11"), ``cloudpickle`` (version), ``protocol``,
               ``torch`` (whether the client has torch: only then is a tensor sent as a value)
``run``        ``fn``: the function's own pickle stream, buffers: pickled ``(args, kwargs)``;
               or, without ``fn`` (a function whose pickle has out-of-band buffers), buffers:
               pickled ``(fn, args, kwargs)``. The value comes back in ``result``
``cell``       ``source``: a cell, run by the session's IPython shell; ``result`` carries the
               value of the last expression: its ``mime`` bundle and ``handle`` (the name it
               is kept under, ``_N``), and the value itself only when it is plain data
``push``       buffers: a pickled ``dict`` merged into the namespace
``pull``       ``names``: list of names; ``result`` carries a pickled tuple of values
``interrupt``  raise ``KeyboardInterrupt`` in this session's running code (``target`` request
               id, or 0 for whatever of this session runs)
``cancel``     ``target``: drop that queued request; ``result`` ``{cancelled: bool}``
``reset``      clear the namespace (the models stay loaded)
``ack``        ``seq``: as a request's ``ack``, when many frames arrived without a request
=============  ==========================================================================

Any request may carry ``upload`` instead of buffers: the id ``PUT /session/{id}/upload``
answered for a body written by :func:`encode_stream`. The client does this when a request's
buffers pass ``CHUNK``: an HTTP body is read straight into the buffers it fills, where
WebSocket messages from a client are masked and then copied several times on the way.

Server -> client (each has ``seq``, increasing within a session, so a client that reconnects
gets exactly what it missed):

=============  ==========================================================================
``welcome``    ``session``, ``resumed`` (bool), ``python``, ``cloudpickle``, ``server``
               (version), ``last_request`` (highest request id the server has received, so
               the client resends only what never arrived), ``mismatch`` (a line or None),
               ``session_buffer`` (bytes the server keeps unacknowledged: the client acks
               at least every quarter of it)
``started``    the request left the queue and runs now; ``job`` is its id in ``/jobs``
               (sent only for requests that asked with ``notify_start``: futures)
``stream``     ``name`` ("stdout"/"stderr"), ``text``
``display``    ``data`` (mimebundle: mime -> str or bytes), ``metadata``
``progress``   ``bar`` (id), ``n``, ``total``, ``desc``, ``unit``, ``elapsed``, ``closed``
``result``     the request's outcome; buffers: the pickled value where there is one;
               ``mime``, ``handle``: rich repr of a cell's last value and the name it is kept
               under; ``kept``: why that value stayed on the server; ``fields`` for small
               plain answers
``error``      ``ename``, ``evalue``, ``traceback`` (lines, server frames trimmed), and
               ``code``: one of :mod:`.codes` ("remote": the user's code raised, "pickle",
               "name", "version", "cancelled", "bad_request")
=============  ==========================================================================

Limits: a frame lists at most ``MAX_BUFFERS`` buffers; the hello must arrive within
``HELLO_TIMEOUT_S`` of the connection (else the socket is closed with ``CLOSE_PROTOCOL_MISUSE``);
request ids run from 1 to 2**63-1 and must increase (a bad one gets an ``error`` naming it). A
newer connection to the same session takes it over: the older socket is closed with
``CLOSE_TAKEN_OVER`` and a reason. Past ``--session-buffer`` of unacknowledged frames, the code
printing waits while a connected client acknowledges as it reads; for a client that is away or
has stopped acknowledging, output frames are dropped and one ``stream`` line (stderr) says how
much, before the request's next frame; ``result`` and ``error`` frames are never dropped.
"""

from __future__ import annotations

from .bodies import DEFAULT_DTYPE as DEFAULT_DTYPE
from .bodies import DETECT as DETECT
from .bodies import DTYPE_SPELLINGS as DTYPE_SPELLINGS
from .bodies import DTYPES as DTYPES
from .bodies import GREEDY_BELOW as GREEDY_BELOW
from .bodies import IMAGE_SIDE_STEP as IMAGE_SIDE_STEP
from .bodies import KINDS as KINDS
from .bodies import MAX_GUIDANCE_SCALE as MAX_GUIDANCE_SCALE
from .bodies import MAX_IMAGE_SIDE as MAX_IMAGE_SIDE
from .bodies import MAX_IMAGES as MAX_IMAGES
from .bodies import MAX_NEW_TOKENS as MAX_NEW_TOKENS
from .bodies import MAX_REPETITION_PENALTY as MAX_REPETITION_PENALTY
from .bodies import MAX_SEED as MAX_SEED
from .bodies import MAX_STEPS as MAX_STEPS
from .bodies import MAX_STOP_STRINGS as MAX_STOP_STRINGS
from .bodies import MAX_TEMPERATURE as MAX_TEMPERATURE
from .bodies import MIN_IMAGE_SIDE as MIN_IMAGE_SIDE
from .bodies import MIN_REPETITION_PENALTY as MIN_REPETITION_PENALTY
from .bodies import DType as DType
from .bodies import DTypeSpelling as DTypeSpelling
from .bodies import GenerateRequest as GenerateRequest
from .bodies import ImageRequest as ImageRequest
from .bodies import Kind as Kind
from .bodies import LoadRequest as LoadRequest
from .bodies import canonical_dtype as canonical_dtype
from .bodies import ignored_fields as ignored_fields
from .chat import MAX_MESSAGES as MAX_MESSAGES
from .chat import ROLES as ROLES
from .chat import ChatMessage as ChatMessage
from .chat import ChatRequest as ChatRequest
from .chat import Role as Role
from .chat import read_messages as read_messages
from .codes import ERROR_BAD_REQUEST as ERROR_BAD_REQUEST
from .codes import ERROR_CANCELLED as ERROR_CANCELLED
from .codes import ERROR_CONFLICT as ERROR_CONFLICT
from .codes import ERROR_NAME as ERROR_NAME
from .codes import ERROR_PICKLE as ERROR_PICKLE
from .codes import ERROR_REMOTE as ERROR_REMOTE
from .codes import ERROR_VERSION as ERROR_VERSION
from .codes import SESSION_ERROR_CODES as SESSION_ERROR_CODES
from .codes import RemoteFailure as RemoteFailure
from .codes import error as error
from .codes import read_error as read_error
from .errors import FrameTooLarge as FrameTooLarge
from .errors import WireFormatError as WireFormatError
from .frames import CHUNK as CHUNK
from .frames import CLOSE_PROTOCOL_MISUSE as CLOSE_PROTOCOL_MISUSE
from .frames import CLOSE_TAKEN_OVER as CLOSE_TAKEN_OVER
from .frames import HELLO_TIMEOUT_S as HELLO_TIMEOUT_S
from .frames import MAX_BUFFERS as MAX_BUFFERS
from .frames import OUTPUT_FRAMES as OUTPUT_FRAMES
from .frames import PROTOCOL_VERSION as PROTOCOL_VERSION
from .frames import PYTHON_VERSION as PYTHON_VERSION
from .frames import TAKEN_OVER_REASON as TAKEN_OVER_REASON
from .frames import Frame as Frame
from .frames import FrameDecoder as FrameDecoder
from .frames import cloudpickle_version as cloudpickle_version
from .frames import encode_frame as encode_frame
from .frames import encode_stream as encode_stream
from .generate_stream import MSG_CANCEL as MSG_CANCEL
from .generate_stream import MSG_DONE as MSG_DONE
from .generate_stream import MSG_ERROR as MSG_ERROR
from .generate_stream import MSG_TOKEN as MSG_TOKEN
from .generate_stream import Cancel as Cancel
from .generate_stream import Done as Done
from .generate_stream import GenerateMessage as GenerateMessage
from .generate_stream import Other as Other
from .generate_stream import Token as Token
from .generate_stream import cancel_message as cancel_message
from .generate_stream import done_message as done_message
from .generate_stream import error_message as error_message
from .generate_stream import read_generate_message as read_generate_message
from .generate_stream import token_message as token_message
from .keepalive import KeepAlive as KeepAlive
from .keepalive import parse_keep_alive as parse_keep_alive
from .messages import REQUEST_KINDS as REQUEST_KINDS
from .messages import Hello as Hello
from .messages import Output as Output
from .messages import Result as Result
from .messages import Welcome as Welcome
from .messages import ack as ack
from .messages import answer as answer
from .messages import display as display
from .messages import hello as hello
from .messages import kept as kept
from .messages import progress as progress
from .messages import read_ack as read_ack
from .messages import read_hello as read_hello
from .messages import read_names as read_names
from .messages import read_output as read_output
from .messages import read_result as read_result
from .messages import read_source as read_source
from .messages import read_started as read_started
from .messages import read_target as read_target
from .messages import read_welcome as read_welcome
from .messages import request as request
from .messages import result as result
from .messages import started as started
from .messages import stream as stream
from .messages import upload as upload
from .messages import welcome as welcome
from .pickling import dumps as dumps
from .pickling import global_names as global_names
from .pickling import loads as loads
from .rest import DTYPE_FLOAT32 as DTYPE_FLOAT32
from .rest import DTYPE_NATIVE as DTYPE_NATIVE
from .rest import EVENT_PROGRESS as EVENT_PROGRESS
from .rest import HEADER_DTYPE as HEADER_DTYPE
from .rest import HEADER_MODEL as HEADER_MODEL
from .rest import MSGPACK as MSGPACK
from .rest import NDJSON as NDJSON
from .rest import ErrorBody as ErrorBody
from .rest import ProgressEvent as ProgressEvent
from .rest import error_body as error_body
from .rest import ndjson_line as ndjson_line
from .rest import pack_tensors as pack_tensors
from .rest import progress_event as progress_event
from .rest import read_error_body as read_error_body
from .rest import read_progress_event as read_progress_event
from .rest import unpack_tensors as unpack_tensors
