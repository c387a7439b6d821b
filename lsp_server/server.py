"""pygls wiring: LSP messages in, :class:`~difill.lsp_server.service.Service` calls, LSP out.

Nothing here decides anything about completion; see service.py, completion.py, documents.py.
The protocol subclass changes three things about pygls:

* ``difill/*`` requests keep their params as plain JSON (pygls would turn them into
  namedtuples);
* document sync goes to our own :class:`~difill.lsp_server.documents.DocumentStore` (exact
  UTF-8/16/32 positions, a document never opened is ignored) instead of pygls' workspace;
* messages are read by :mod:`~difill.lsp_server.transport`, which answers malformed ones.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from typing import Any, BinaryIO

from lsprotocol import types
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.protocol import JsonRPCNotification, JsonRPCRequestMessage, LanguageServerProtocol, lsp_method

from difill import __version__
from difill.lsp_server import config
from difill.lsp_server.completion import completion_items, inline_items, word_before
from difill.lsp_server.documents import index_to_units
from difill.lsp_server.engine_host import LOADING
from difill.lsp_server.requests import ParamsError, infill_result, parse_infill, text_document_uri
from difill.lsp_server.service import Service
from difill.lsp_server.transport import Dispatcher, Writer, start_reader

log = logging.getLogger(__name__)

INFILL, STATUS, PARTIAL_ACCEPT, ACCEPT = "difill/infill", "difill/status", "difill/didPartiallyAccept", "difill.accept"
# On exit, how long to wait for the engine's worker to finish its job: a cancelled completion
# stops within one denoising step, a model load runs to its end (seconds).
ENGINE_STOP_WAIT_S = 3.0


# The document a request refers to, as it was when the request arrived. Handlers run as tasks
# that start a loop iteration later, after a didChange that arrived right behind the request
# may already have been applied; the request's position refers to the text before it.
REQUEST_DOCUMENT: contextvars.ContextVar[tuple[str, Any] | None] = contextvars.ContextVar("difill_request_document", default=None)


def _uri_of(params: Any) -> str | None:
    if isinstance(params, dict):
        document = params.get("textDocument")
        uri = document.get("uri") if isinstance(document, dict) else None
    else:
        uri = getattr(getattr(params, "text_document", None), "uri", None)
    return uri if isinstance(uri, str) else None


class DifillProtocol(LanguageServerProtocol):
    def _handle_cancel_notification(self, msg_id):
        future = self._request_futures.get(msg_id)
        if future is not None and not future.done():
            self._server.service.counters.cancelled += 1
        return super()._handle_cancel_notification(msg_id)

    def handle_message(self, message):
        method = getattr(message, "method", None)
        if self._shutdown and method is not None and method != types.EXIT and getattr(message, "id", None) is not None:
            # pygls drops these silently; the client would wait forever
            self._send_response(message.id, error=types.ResponseError(code=-32600, message=f"{method}: the server is shutting down"))
            return None
        return super().handle_message(message)

    def _handle_request(self, msg_id, method_name: str, params: Any):
        if not self._server.initialized and method_name != types.INITIALIZE:
            self._send_response(msg_id, error=types.ResponseError(code=-32002, message=f"{method_name}: the server is not initialized yet"))
            return None
        # pygls runs this inside a fresh context; tasks created for the handler inherit it.
        uri = _uri_of(params)
        if uri is not None:
            REQUEST_DOCUMENT.set((uri, self._server.service.documents.get(uri)))
        return super()._handle_request(msg_id, method_name, params)

    def structure_message(self, data: dict[str, Any]):
        method = data.get("method")
        if isinstance(method, str) and method.startswith("difill/") and "jsonrpc" in data:
            if "id" in data:
                return JsonRPCRequestMessage(id=data["id"], method=method, jsonrpc=data["jsonrpc"], params=data.get("params"))
            return JsonRPCNotification(method=method, jsonrpc=data["jsonrpc"], params=data.get("params"))
        return super().structure_message(data)

    # Document sync: only our store (pygls' workspace would keep a second copy of every text).
    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        yield self.fm.features[types.TEXT_DOCUMENT_DID_OPEN], (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        yield self.fm.features[types.TEXT_DOCUMENT_DID_CHANGE], (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        yield self.fm.features[types.TEXT_DOCUMENT_DID_CLOSE], (params,), None


class DifillServer(LanguageServer):
    def __init__(self, settings: config.Settings):
        super().__init__("difill", __version__, text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
                         protocol_cls=DifillProtocol)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.service = Service(settings, self)
        self.service.on_loaded.append(self._loaded)
        self._progress_tokens: list[str] = []
        self.exit_code = 0
        self.initialized = False
        self.engine_stopped = True  # False after serve(): the engine's worker was still in a job

    # ---------------------------------------------------------------- Client interface (any thread)
    def _on_loop(self, fn, *args) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile: the server is exiting
            pass

    def notify(self, method: str, params: Any) -> None:
        self._on_loop(self.protocol.notify, method, params)

    def show_message(self, error: bool, text: str) -> None:
        kind = types.MessageType.Error if error else types.MessageType.Info
        self._on_loop(self.window_show_message, types.ShowMessageParams(type=kind, message=text))

    def log_message(self, level: int, text: str) -> None:
        kind = (types.MessageType.Error if level >= logging.ERROR else types.MessageType.Warning if level >= logging.WARNING
                else types.MessageType.Info if level >= logging.INFO else types.MessageType.Log)
        self._on_loop(self.window_log_message, types.LogMessageParams(type=kind, message=text))

    def report_server_error(self, error: Exception, source: Any) -> None:
        """pygls would pop up "Error in server" for errors outside requests; a completion
        server should not interrupt the user: the log has it, requests get their error."""
        log.error("server error (%s): %s", getattr(source, "__name__", source), error)

    # ---------------------------------------------------------------- serving
    def serve(self, reader: BinaryIO, writer: BinaryIO) -> int:
        """Serve one client until ``exit`` or the end of input; returns the exit code."""
        self.loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.protocol.set_writer(Writer(writer))

        def stop(code: int) -> None:
            self.exit_code = code
            loop.stop()

        dispatcher = Dispatcher(self.protocol, on_exit=stop)
        start_reader(reader, loop, dispatcher, on_eof=lambda: stop(0))
        try:
            loop.run_forever()
        finally:
            self.engine_stopped = self.service.shutdown(wait_s=ENGINE_STOP_WAIT_S)
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
        log.info("server stopped (exit code %d)", self.exit_code)
        return self.exit_code

    async def report_loading(self) -> None:
        """Work done progress for a model load, if the client supports it. The "end" is sent by
        :meth:`_loaded`, in the same loop callback that makes the state ready or failed."""
        capabilities = self.protocol.client_capabilities
        host = self.service.host
        if not (capabilities.window and capabilities.window.work_done_progress) or host.state != LOADING:
            return
        token = f"difill-load-{host._generation}"
        try:
            await self.work_done_progress.create_async(token)
        except Exception as exc:  # the client refused: no progress bar, loading goes on
            log.info("no work done progress: %s", exc)
            return
        if host.state != LOADING:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=f"model {host.state}"))
            return
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title="difill", message=host.message))
        self._progress_tokens.append(token)

    def _loaded(self, state: str, message: str) -> None:
        for token in self._progress_tokens:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=f"model {state}: {message}"))
            self.work_done_progress.tokens.pop(token, None)
        self._progress_tokens.clear()


def build_server(settings: config.Settings) -> DifillServer:
    server = DifillServer(settings)
    service = server.service

    def arrived(uri: str):
        """The document as it was when the current request arrived."""
        taken = REQUEST_DOCUMENT.get()
        return taken[1] if taken is not None and taken[0] == uri else service.documents.get(uri)

    @server.feature(types.INITIALIZE)
    def initialize(ls: DifillServer, params: types.InitializeParams) -> None:
        encoding = ServerCapabilitiesBuilder.choose_position_encoding(params.capabilities)
        service.documents.encoding = str(getattr(encoding, "value", encoding))
        if params.initialization_options is not None:
            for warning in service.configure(params.initialization_options):
                ls.log_message(logging.WARNING, f"difill: {warning}")
        ls.initialized = True
        service.start(asyncio.get_running_loop())
        log.info("initialize: position encoding %s, settings %s", service.documents.encoding, service.settings.to_dict())

    @server.feature(types.INITIALIZED)
    async def initialized(ls: DifillServer, params: types.InitializedParams) -> None:
        await ls.report_loading()

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: DifillServer, params: Any) -> None:
        service.shutdown()

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: DifillServer, params: types.DidOpenTextDocumentParams) -> None:
        d = params.text_document
        service.documents.open(d.uri, d.text, d.language_id, d.version)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: DifillServer, params: types.DidChangeTextDocumentParams) -> None:
        changes = []
        for change in params.content_changes:
            range_ = getattr(change, "range", None)
            changes.append((change.text, None if range_ is None else
                            ((range_.start.line, range_.start.character), (range_.end.line, range_.end.character))))
        service.documents.change(params.text_document.uri, params.text_document.version, changes)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: DifillServer, params: types.DidCloseTextDocumentParams) -> None:
        service.did_close(params.text_document.uri)

    def apply_settings(ls: DifillServer, settings: Any) -> None:
        generation = service.host._generation
        for warning in service.configure(settings):
            ls.log_message(logging.WARNING, f"difill: {warning}")
        if service.host._generation != generation:
            asyncio.ensure_future(ls.report_loading())

    async def pull_settings(ls: DifillServer) -> None:
        try:
            answer = await ls.workspace_configuration_async(types.ConfigurationParams(items=[types.ConfigurationItem(section="difill")]))
        except Exception as exc:
            log.warning("workspace/configuration failed: %s", exc)
            return
        apply_settings(ls, answer[0] if answer else None)

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: DifillServer, params: types.DidChangeConfigurationParams) -> None:
        """Synchronous, so that settings apply before the next message is handled. Empty
        settings mean "ask me" (the pull model): then the server asks with workspace/configuration."""
        capabilities = ls.protocol.client_capabilities
        if not params.settings and capabilities.workspace and capabilities.workspace.configuration:
            asyncio.ensure_future(pull_settings(ls))
        else:
            apply_settings(ls, params.settings)

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: DifillServer, params: types.InlineCompletionParams) -> list[types.InlineCompletionItem]:
        service.counters.requests += 1
        service.counters.inline += 1
        context = params.context
        selected = context.selected_completion_info if context is not None else None
        automatic = context is not None and context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
        selection = None
        if selected is not None:
            r = selected.range
            selection = ((r.start.line, r.start.character), (r.end.line, r.end.character), selected.text)
        uri = params.text_document.uri
        suggestion = await service.suggest_at(uri, params.position.line, params.position.character,
                                              automatic=automatic, selected=selection, document=arrived(uri))
        return inline_items(suggestion.texts, params.position, suggestion.item_ids, selected)

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(resolve_provider=False))
    async def completion(ls: DifillServer, params: types.CompletionParams) -> types.CompletionList:
        service.counters.requests += 1
        service.counters.completion += 1
        uri = params.text_document.uri
        document = arrived(uri)
        suggestion = await service.suggest_at(uri, params.position.line, params.position.character, document=document)
        if not suggestion.texts or suggestion.window is None or document is None:
            return types.CompletionList(is_incomplete=True, items=[])
        word = word_before(suggestion.window.line_before)
        word_units = index_to_units(word, len(word), service.documents.encoding)
        return types.CompletionList(is_incomplete=True, items=completion_items(
            suggestion.texts, params.position, word_units, word, suggestion.item_ids, document.language_id))

    @server.feature(INFILL)
    async def infill(ls: DifillServer, params: Any) -> dict:
        service.counters.requests += 1
        service.counters.infill += 1
        try:
            call = parse_infill(params, service.settings, ls.protocol.msg_id)
        except ParamsError as exc:
            raise JsonRpcInvalidParams(f"Invalid params for {INFILL}: {exc}") from exc
        if call.uri is not None:
            suggestion = await service.suggest_at(call.uri, call.line, call.character, options=call.options,
                                                  progress_token=call.progress_token, document=arrived(call.uri))
        else:
            suggestion = await service.suggest_text(call.prefix or "", call.suffix, call.language, call.path, call.options,
                                                    call.document_key, call.progress_token)
        return infill_result(suggestion)

    @server.feature(STATUS)
    def status(ls: DifillServer, params: Any) -> dict:
        try:
            uri = text_document_uri(params, required=False) if isinstance(params, dict) else None
        except ParamsError as exc:
            raise JsonRpcInvalidParams(f"Invalid params for {STATUS}: {exc}") from exc
        return service.status(uri)

    @server.feature(PARTIAL_ACCEPT)
    def did_partially_accept(ls: DifillServer, params: Any) -> None:
        if isinstance(params, dict):
            service.partially_accepted(params.get("itemId"), params.get("acceptedLength"))

    @server.command(ACCEPT)
    def accept(ls: DifillServer, *args: Any) -> bool:
        return service.accepted(args[0] if args else None)

    return server


class ClientLogHandler(logging.Handler):
    """Forwards difill's own log records to the editor (window/logMessage) once initialized."""

    def __init__(self, server: DifillServer, level: int):
        super().__init__(level)
        self.server = server
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.server.initialized or not record.name.startswith("difill") or getattr(self._local, "busy", False):
            return
        self._local.busy = True  # never recurse through our own sending
        try:
            self.server.log_message(record.levelno, self.format(record))
        except Exception:
            pass
        finally:
            self._local.busy = False
