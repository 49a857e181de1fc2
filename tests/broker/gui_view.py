"""Karabo's Qt GUI (karabo-gui 3.1.2) looking at a device, driven without a person.

Run with the GUI environment's interpreter (``KBSTREAM_GUI_PYTHON``) on an X display (Xvfb):

    python gui_view.py HOST PORT DEVICE OUTPUT IMAGE_PATH SCREENSHOT [TIMEOUT]

It connects to the GuiServerDevice at HOST:PORT as the login dialog's non-authenticated
connect does, waits until the System Topology holds DEVICE under a server, opens DEVICE in
the configurator, opens an image panel for the ImageData at IMAGE_PATH (below the output
channel OUTPUT), waits for an image to arrive there, saves a screenshot of the screen to
SCREENSHOT and prints one JSON object with what the GUI holds:

    {"topology": {"host", "server", "class", "device"},  # the tree path of DEVICE
     "serverClasses": [...],                            # deviceClasses of its server
     "outputBinding": "PipelineOutputBinding", "outputSchemaNode": bool,
     "imageBinding": "ImageBinding",
     "image": {"shape", "dtype", "values"}}             # the pixels the GUI decoded

or ``{"error": ...}`` with what it reached, exit status 1.
"""

import json
import sys
import time


def main():
    host, port, device, output, image_path, shot = sys.argv[1:7]
    timeout = float(sys.argv[7]) if len(sys.argv) > 7 else 120.0

    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from karabogui.programs.base import create_gui_app, init_gui
    from karabogui.singletons.api import get_config, get_network, get_topology

    app = create_gui_app([])
    get_config()["check_updates"] = False  # no remote update check (no network here)
    init_gui(app, use_splash=False)

    from karabogui.binding.api import PropertyProxy
    from karabogui.controllers.arrays import get_dimensions_and_encoding, get_image_data
    from karabogui.events import KaraboEvent, broadcast_event
    from karabogui.generic_scenes import get_property_proxy_model

    broadcast_event(KaraboEvent.CreateMainWindow, {})
    network = get_network()
    network.hostname = host
    network.port = int(port)
    network.startServerConnection()

    state = {"step": "topology", "t0": time.monotonic(), "result": {}}

    def tree_path():
        node = get_topology().system_tree.get_instance_node(device)
        if node is None:
            return None
        cls = node.parent
        server = cls.parent if cls is not None else None
        hst = server.parent if server is not None else None
        if hst is None:
            return None
        return {"host": hst.node_id, "server": server.node_id, "class": cls.node_id,
                "device": node.node_id}, server

    def finish(code):
        for w in QApplication.topLevelWidgets():
            if w.isVisible():
                w.repaint()
        app.processEvents()
        QApplication.primaryScreen().grabWindow(0).save(shot, "png")
        print(json.dumps(state["result"]), flush=True)
        network.endServerConnection()
        app.exit(code)

    def step():
        r = state["result"]
        if time.monotonic() - state["t0"] > timeout:
            r["error"] = f"timeout in step {state['step']!r}"
            finish(1)
            return
        try:
            if state["step"] == "topology":
                found = tree_path()
                if found is None:
                    return
                r["topology"], server = found
                r["serverClasses"] = sorted(server.attributes.get("deviceClasses", []))
                proxy = get_topology().get_device(device)
                state["proxy"] = proxy
                broadcast_event(KaraboEvent.ShowConfiguration, {"proxy": proxy})
                state["step"] = "schema"
            elif state["step"] == "schema":
                proxy = state["proxy"]
                out = proxy.get_property_binding(output)
                img = proxy.get_property_binding(image_path)
                if out is None or img is None:
                    return
                r["outputBinding"] = type(out).__name__
                r["outputSchemaNode"] = proxy.get_property_binding(
                    f"{output}.schema") is not None
                r["imageBinding"] = type(img).__name__
                prop = PropertyProxy(root_proxy=proxy, path=image_path)
                model = get_property_proxy_model(prop, include_images=True)
                if model is None:
                    r["error"] = f"the GUI offers no widget for {image_path}"
                    finish(1)
                    return
                broadcast_event(KaraboEvent.ShowUnattachedController, {"model": model})
                state["step"] = "image"
            elif state["step"] == "image":
                node = state["proxy"].get_property_binding(image_path).value
                try:
                    dims = get_dimensions_and_encoding(node)
                except (TypeError, AttributeError):  # no image yet: values undefined
                    return
                if not dims or not dims[0]:
                    return
                data = get_image_data(node, *dims[:3])
                if data is None or not data.size:
                    return
                r["image"] = {"shape": list(data.shape), "dtype": str(data.dtype),
                              "values": data.ravel().tolist()}
                state["step"] = "shot"
                state["t_shot"] = time.monotonic()
            elif state["step"] == "shot":
                if time.monotonic() - state["t_shot"] < 2.0:  # let the panel paint it
                    return
                _arrange()
                state["step"] = "done"
                QTimer.singleShot(1500, lambda: finish(0))
        except Exception as e:  # reported, not hidden
            r["error"] = f"{state['step']}: {type(e).__name__}: {e}"
            finish(1)

    def _arrange():
        """Main window left, the image panel right, both on screen."""
        geo = QApplication.primaryScreen().geometry()
        main = [w for w in QApplication.topLevelWidgets()
                if w.isVisible() and type(w).__name__ == "MainWindow"]
        others = [w for w in QApplication.topLevelWidgets()
                  if w.isVisible() and type(w).__name__ != "MainWindow"
                  and w.width() > 100]
        if main:
            main[0].setGeometry(0, 0, int(geo.width() * 0.62), geo.height())
        for view in QApplication.allWidgets():  # the configurator: show output's nodes
            if type(view).__name__ == "ConfigurationTreeView":
                view.expandAll()
        for w in others:
            w.setGeometry(int(geo.width() * 0.62), 0, int(geo.width() * 0.38),
                          int(geo.height() * 0.7))
            w.raise_()

    timer = QTimer()
    timer.timeout.connect(step)
    timer.start(200)
    sys.exit(app.exec_())


if __name__ == "__main__":
    main()
