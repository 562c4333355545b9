"""The waitress internals noyo_listener relies on. If an upgrade of waitress
changes any of them, these fail before production does.

- ``_Channel.writable`` returns False while a task runs: safe only because
  ``HTTPChannel.service`` pulls the loop's trigger after a task ends.
- graceful shutdown wraps ``ThreadedTaskDispatcher.shutdown`` and reads its
  ``queue``, ``active_count`` and ``lock``; it stops the loop by SystemExit,
  which ``BaseWSGIServer.run`` catches; it closes the listening socket alone
  and keeps running the loop over ``_map`` for requests still arriving (a
  channel's ``request`` parser, ``headers_finished``, ``completed``); it then
  flushes through ``_map``.
- bad requests answered by waitress itself are logged via ``error_task_class``.
"""

from __future__ import annotations

import inspect

import waitress
import waitress.channel
import waitress.server
import waitress.task

import noyo_listener


def test_service_pulls_the_trigger_after_a_task_ends():
    source = inspect.getsource(waitress.channel.HTTPChannel.service)
    after_pop = source[source.index("self.requests.pop(0)"):]
    assert "self.server.pull_trigger()" in after_pop


def test_channel_state_the_writable_override_reads():
    channel = waitress.channel.HTTPChannel
    for name in ("will_close", "close_when_flushed", "total_outbufs_len", "writable", "error_task_class"):
        assert hasattr(channel, name), name
    assert "self.requests = []" in inspect.getsource(channel.__init__)
    assert hasattr(waitress.adjustments.Adjustments, "outbuf_high_watermark")
    assert issubclass(noyo_listener._Channel, channel)
    assert issubclass(noyo_listener._LoggedErrorTask, waitress.task.ErrorTask)


def test_dispatcher_state_the_shutdown_wrapper_reads():
    dispatcher = waitress.task.ThreadedTaskDispatcher()
    assert hasattr(dispatcher, "queue") and hasattr(dispatcher, "active_count") and hasattr(dispatcher, "lock")
    parameters = inspect.signature(dispatcher.shutdown).parameters
    assert list(parameters) == ["cancel_pending", "timeout"]


def test_run_stops_on_system_exit_and_shuts_the_dispatcher_down():
    source = inspect.getsource(waitress.server.BaseWSGIServer.run)
    assert "SystemExit" in source and "task_dispatcher.shutdown()" in source


def test_the_server_keeps_its_socket_map_and_channel_class(tmp_path):
    ini = tmp_path / "w.ini"
    ini.write_text(f"[server]\nport = 0\n[webhook]\nsecrets = s\n[database]\npath = {tmp_path}/w.sqlite3\n")
    settings = noyo_listener.load_settings(str(ini), environ={})
    server = noyo_listener.create_http_server(settings, lambda environ, start_response: [])
    try:
        assert isinstance(server._map, dict)
        assert server.channel_class is noyo_listener._Channel
        assert hasattr(server, "task_dispatcher")
    finally:
        server.close()
        server.task_dispatcher.shutdown()


def test_channel_and_parser_state_the_shutdown_grace_reads():
    # A channel's request being received is ``channel.request``, a parser with
    # ``headers_finished`` and ``completed``; a completed one becomes a task
    # through ``server.add_task`` as the loop reads it.
    import waitress.parser
    import waitress.wasyncore
    assert waitress.channel.HTTPChannel.request is None
    assert waitress.parser.HTTPRequestParser.headers_finished is False
    assert waitress.parser.HTTPRequestParser.completed is False
    received = inspect.getsource(waitress.channel.HTTPChannel.received)
    assert "self.request = self.parser_class(" in received and "self.server.add_task(self)" in received
    # Closing the listening socket alone, keeping the loop's trigger.
    assert "self.trigger.close()" in inspect.getsource(waitress.server.BaseWSGIServer.close)
    assert "self.del_channel()" in inspect.getsource(waitress.wasyncore.dispatcher.close)
    assert {"timeout", "map", "use_poll", "count"} <= set(inspect.signature(waitress.wasyncore.loop).parameters)
