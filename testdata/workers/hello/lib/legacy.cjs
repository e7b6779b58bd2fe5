module.exports = {
  shout(text) {
    return text.toUpperCase();
  },
};
