// This pack's nodes are made wide enough for their widgets' labels and values when added (as core's 3D
// nodes set their own default size) and widen when a longer value is picked, so that no label is cut
// ("ex… mole_face_sd15.safetensors"). A node never narrows; a loaded workflow keeps its saved sizes.
import { app } from "../../scripts/app.js";
import { fitLabels } from "./labels.js";

const PACK_NODE = /^(MoLE|MoA)_/;

app.registerExtension({
  name: "MoLE-MoA.FitWidgetLabels",
  nodeCreated(node) {
    if (!PACK_NODE.test(node.constructor?.comfyClass ?? node.comfyClass ?? "")) return;
    fitLabels(node);
    const changed = node.onWidgetChanged;
    node.onWidgetChanged = function (...args) {
      const result = changed?.apply(this, args);
      fitLabels(this);
      return result;
    };
  },
});
